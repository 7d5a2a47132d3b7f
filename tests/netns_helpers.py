"""Two network namespaces joined by one veth pair, for tests that cut and break a real link.

``veth_link()`` makes ``embxfer-<pid>-<n>-enc`` and ``embxfer-<pid>-<n>-lang``, joins them
with a veth pair created directly inside them (the host's own namespace never holds an
end), gives the ends 198.18.0.1/30 and 198.18.0.2/30 (RFC 2544's range for test networks)
and brings ``lo`` and the ends up.  Neither namespace has any other interface or a default
route, so every packet the processes send stays on that pair.

Clean-up (kill the processes started in the namespaces, delete the namespaces, which
destroys the veth pair) runs on every way out we can catch: the ``with`` block's
``finally`` (return, assertion, KeyboardInterrupt), an ``atexit`` hook (pytest swallows a
KeyboardInterrupt before fixture teardown), SIGTERM/SIGHUP; and a SIGKILLed run's leftovers
are swept by the next run (names carry the creating pid; only dead pids' are removed), and
the processes die with the test process (PR_SET_PDEATHSIG).

``unavailable_reason()`` says why this machine refuses (not root, no ``ip``, namespaces or
veth pairs not permitted), or None.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

ENC_IP, LANG_IP, PREFIX_LEN = "198.18.0.1", "198.18.0.2", 30
NS_PATTERN = re.compile(r"^embxfer-(\d+)-(\d+)-(enc|lang)$")
CLI = [sys.executable, "-m", "embxfer.adapters.cli"]
_serial = itertools.count(1)


class Refused(Exception):
    """The machine does not let us build the namespaces: the test is skipped with this reason."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root; this run is uid %d)" % os.geteuid()
    if shutil.which("ip") is None:
        return "`ip` (Debian's iproute2) is not installed: `make system-deps` installs it"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns: str) -> None:
    """SIGKILL what runs in one of our namespaces: only a test run put anything there."""
    for pid in ip("netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def sweep_stale() -> list[str]:
    """Delete namespaces an earlier, killed run left behind (their creating pid is gone)."""
    listed = ip("netns", "list", check=False).stdout
    removed = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        match = NS_PATTERN.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _kill_inside(name)
            ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, even by SIGKILL
    (PR_SET_PDEATHSIG survives `ip netns exec`'s exec of the CLI)."""
    if _prctl is not None:
        _prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG; looked up before fork, only called here


class Proc:
    """A process started in a namespace; threads drain stdout/stderr so pipes never fill, and
    ``wait_for`` blocks (with a timeout) until the output matches — no sleeps."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.text = {"out": "", "err": ""}
        self._eof = {"out": False, "err": False}
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env, preexec_fn=_die_with_parent)
        self.exited_at: float | None = None
        self._threads = [threading.Thread(target=self._pump, args=(key, stream), daemon=True, name=f"{name}-{key}")
                         for key, stream in (("out", self.popen.stdout), ("err", self.popen.stderr))]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self, key: str, stream: Any) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if chunk:
                    self.text[key] += decoder.decode(chunk)
                else:
                    self.text[key] += decoder.decode(b"", final=True)
                    self._eof[key] = True
                self._cond.notify_all()
            if not chunk:
                return

    def wait_for(self, test: Callable[[str], Any], key: str = "err", timeout: float = 60.0, what: str = "") -> Any:
        """Block until ``test(output)`` is truthy; returns its value.  Fails (with the output)
        on timeout or when the stream ends without it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = test(self.text[key])
                if value:
                    return value
                left = deadline - time.monotonic()
                if self._eof[key] or left <= 0:
                    why = "ended" if self._eof[key] else f"did not show it within {timeout:g} s"
                    raise AssertionError(f"{self.name} {why} ({what or test}):\n{self.describe()}")
                self._cond.wait(left)

    def wait(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:g} s:\n{self.describe()}") from None
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        for thread in self._threads:
            thread.join(10)
        return code

    def running(self) -> bool:
        return self.popen.poll() is None

    def summary(self) -> dict[str, Any]:
        lines = [ln for ln in self.text["out"].splitlines() if ln.startswith("{")]
        assert lines, f"{self.name} printed no JSON summary:\n{self.describe()}"
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary

    def describe(self) -> str:
        tail = lambda s: s[-3000:].replace("\r", "\n")  # noqa: E731  (tqdm redraws with \r)
        return (f"  argv: {' '.join(self.argv)}\n  exit: {self.popen.poll()}\n"
                f"  stdout: {tail(self.text['out'])}\n  stderr: {tail(self.text['err'])}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


class VethLink:
    """Two namespaces and the veth pair between them; see the module docstring."""

    def __init__(self, env: dict[str, str]) -> None:
        serial = next(_serial)
        pid = os.getpid()
        self.enc_ns, self.lang_ns = f"embxfer-{pid}-{serial}-enc", f"embxfer-{pid}-{serial}-lang"
        self.enc_dev, self.lang_dev = f"ex{pid}x{serial}e", f"ex{pid}x{serial}l"  # <= 15 characters
        assert len(self.enc_dev) <= 15, self.enc_dev
        self.enc_ip, self.lang_ip = ENC_IP, LANG_IP
        self.env = env
        self.procs: list[Proc] = []
        self.shaped = ""
        self._made: list[str] = []
        self._cleaned = False

    # -- building and tearing down -------------------------------------------------------
    def create(self) -> None:
        for ns in (self.enc_ns, self.lang_ns):
            result = ip("netns", "add", ns, check=False)
            if result.returncode != 0:
                raise Refused(f"`ip netns add` was refused: {result.stderr.strip() or result.returncode}")
            self._made.append(ns)
        result = ip("-n", self.enc_ns, "link", "add", self.enc_dev, "type", "veth",
                    "peer", "name", self.lang_dev, "netns", self.lang_ns, check=False)
        if result.returncode != 0:
            raise Refused(f"creating a veth pair was refused: {result.stderr.strip() or result.returncode}")
        probe = subprocess.run(["ip", "netns", "exec", self.enc_ns, sys.executable, "-c", "pass"],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            raise Refused(f"`ip netns exec` was refused: {probe.stderr.strip() or probe.returncode}")
        for ns, dev, addr in ((self.enc_ns, self.enc_dev, self.enc_ip), (self.lang_ns, self.lang_dev, self.lang_ip)):
            ip("-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        self.wait_up()
        self.check_isolated()

    def cleanup(self) -> None:
        """Idempotent: kill our processes, delete our namespaces (the veth pair goes with them)."""
        if self._cleaned:
            return
        self._cleaned = True
        for proc in self.procs:
            proc.kill()
        for ns in self._made:
            _kill_inside(ns)  # anything still there was started by this test through `ip netns exec`
            ip("netns", "del", ns, check=False)
        left = [ns for ns in self._made if ns in ip("netns", "list", check=False).stdout.split()]
        if left:
            print(f"netns cleanup: could not delete {left}", file=sys.__stderr__, flush=True)

    def check_isolated(self) -> None:
        """Each namespace has lo and its end of the pair, and routes only the pair's /30."""
        for ns, dev in ((self.enc_ns, self.enc_dev), (self.lang_ns, self.lang_dev)):
            links = sorted(entry["ifname"] for entry in json.loads(ip("-j", "-n", ns, "link", "show").stdout))
            assert links == sorted(["lo", dev]), (ns, links)
            routes = json.loads(ip("-j", "-n", ns, "-4", "route", "show", "table", "all").stdout)
            off_link = [r for r in routes if r.get("table") != "local" and r.get("dst") != f"198.18.0.0/{PREFIX_LEN}"]
            assert not off_link, (ns, off_link)

    # -- the link ------------------------------------------------------------------------
    def _state(self, ns: str, dev: str) -> tuple[str, list[str]]:
        entry = json.loads(ip("-j", "-n", ns, "link", "show", "dev", dev).stdout)[0]
        return entry.get("operstate", ""), entry.get("flags", [])

    def wait_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [self._state(self.enc_ns, self.enc_dev), self._state(self.lang_ns, self.lang_dev)]
            if all(op == "UP" and "LOWER_UP" in flags for op, flags in states):
                return
            assert time.monotonic() < deadline, f"veth pair not up after {timeout:g} s: {states}"
            time.sleep(0.02)  # polling the kernel's link state: there is no event to wait on here

    def cut(self) -> float:
        """``ip link set <encode end> down``; returns the monotonic time it took effect."""
        ip("-n", self.enc_ns, "link", "set", self.enc_dev, "down")
        return time.monotonic()

    def restore(self) -> None:
        ip("-n", self.enc_ns, "link", "set", self.enc_dev, "up")
        self.wait_up()

    def shape(self, rate: str) -> bool:
        """Rate-limit encode -> language with tbf so a transfer lasts long enough to cut into.
        Returns False (unshaped) when the kernel has no tbf."""
        result = subprocess.run(["tc", "-n", self.enc_ns, "qdisc", "add", "dev", self.enc_dev, "root", "tbf",
                                 "rate", rate, "burst", "32kbit", "latency", "500ms"],
                                capture_output=True, text=True, timeout=30) if shutil.which("tc") else None
        self.shaped = rate if result is not None and result.returncode == 0 else ""
        return bool(self.shaped)

    def bytes_sent(self, side: str = "enc") -> int:
        ns, dev = (self.enc_ns, self.enc_dev) if side == "enc" else (self.lang_ns, self.lang_dev)
        entry = json.loads(ip("-j", "-s", "-n", ns, "link", "show", "dev", dev).stdout)[0]
        return int(entry["stats64"]["tx"]["bytes"])

    # -- processes -----------------------------------------------------------------------
    def run(self, side: str, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        ns = self.enc_ns if side == "enc" else self.lang_ns
        proc = Proc(name, ["ip", "netns", "exec", ns, *CLI, *args], {**os.environ, **self.env, **(env or {})})
        self.procs.append(proc)
        return proc


@contextlib.contextmanager
def veth_link(env: dict[str, str]) -> Iterator[VethLink]:
    """Build the link; raise ``Refused`` if the machine will not; clean up on every exit."""
    reason = unavailable_reason()
    if reason:
        raise Refused(reason)
    sweep_stale()
    link = VethLink(env)
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        link.cleanup()
        signal.signal(signum, previous.get(signal.Signals(signum)) or signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    atexit.register(link.cleanup)  # pytest handles KeyboardInterrupt without tearing fixtures down
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        link.create()
        yield link
    finally:
        link.cleanup()
        atexit.unregister(link.cleanup)
        for signum, handler in previous.items():
            signal.signal(signum, handler or signal.SIG_DFL)
