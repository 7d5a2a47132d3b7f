"""Operating the servers (the real CLIs, two or three processes on 127.0.0.1): who may hold a
rank, what Ctrl-C does at every moment, what the logs and summaries say."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import time

from test_two_process import CLI, SETTINGS, language, start_encode, stop_encode, summary_of


def wait_for_progress(process: subprocess.Popen, requests: int) -> str:
    """Read the progress bar until rooms complete; returns what it read of stderr."""
    seen = ""
    while not any(int(n) > 0 for n in re.findall(rf"(\d+)/{requests}", seen)):
        chunk = process.stderr.read(1)
        assert chunk, "serve-language ended before showing progress"
        seen += chunk
    return seen


def test_a_second_client_on_a_held_rank_is_refused_at_once_and_the_holder_loses_nothing():
    """The easy slip: a second serve-language left on the default --rank 0 beside a running
    one.  It is refused with the reason (both sides print it) and exits non-zero within 2 s
    of registering; the holder keeps every room."""
    encode, addr = start_encode()
    try:
        holder = language(addr, 100000, "--in-flight", "8")
        wait_for_progress(holder, 100000)
        second = subprocess.Popen(
            [*CLI, "serve-language", "--bootstrap-addr", addr, "--requests", "200", "--first-room", "1000000",
             "--verify", "--synthetic-seed", "5", *SETTINGS],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = second.stderr.readline()
        assert "registering with" in line, line
        registering = time.monotonic()
        _, err = second.communicate(timeout=60)
        refused_after = time.monotonic() - registering
        assert second.returncode == 2, err
        assert "rank 0 is held by a live language process" in err and "pass another --rank or stop it" in err, err
        assert refused_after < 2.0, f"refused only after {refused_after:.2f} s"
        holder.send_signal(signal.SIGINT)
        out, err = holder.communicate(timeout=60)
        summary = summary_of(out)
        assert summary["interrupted"] and summary["failed"] == 0 and summary["wrong_rows"] == 0, summary
        assert summary["succeeded"] > 0 and summary["leaked_blocks"] == 0 and summary["quarantined_at_exit"] == 0
        print(f"[operating] second client on a held rank: refused {refused_after:.2f} s after registering; "
              f"holder {summary['succeeded']} succeeded, 0 failed")
    finally:
        encode.send_signal(signal.SIGINT)
        out, encode_err = encode.communicate(timeout=30)
    assert "refused a registration as rank 0: rank 0 is held by a live language process" in encode_err, encode_err


def test_a_killed_language_process_restarted_at_once_takes_its_rank_back():
    """kill -9 closes the holder's connection: its restart is not refused as a second client
    and is served without waiting out the heartbeat limit."""
    encode, addr = start_encode()
    try:
        doomed = language(addr, 100000, "--in-flight", "8")
        wait_for_progress(doomed, 100000)
        doomed.kill()
        doomed.communicate(timeout=30)
        restarted = language(addr, 20, "--no-progress")
        out, err = restarted.communicate(timeout=120)
        assert restarted.returncode == 0, err
        summary = summary_of(out)
        assert summary["succeeded"] == 20 and summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0
        print(f"[operating] kill -9 then an immediate restart on rank 0: 20/20 exact in {summary['seconds']:.2f} s")
    finally:
        encode_summary = stop_encode(encode)
    counters = encode_summary["counters"]
    assert counters["peers_disconnected"] >= 1 and counters["peers_restarted"] == 1, counters
    assert counters.get("registrations_held", 0) == 0 and encode_summary["sources_held"] == 0


def status_lines(encode: subprocess.Popen, timeout: float):  # type: ignore[no-untyped-def]
    """serve-encode --status-every lines as they come (stdout), for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([encode.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            return
        line = encode.stdout.readline()
        assert line, "serve-encode exited"
        if line.startswith('{"status"'):
            yield json.loads(line)


def stop_with_a_write_stuck(encode: subprocess.Popen, addr: str) -> subprocess.Popen:
    """A language process SIGSTOPped while the encode side has a write into its pool in the
    data plane; returns once that write has been stuck for a second.  (A stop that happens
    to catch no write in flight is resumed and tried again.)"""
    peer = language(addr, 100000, "--in-flight", "8")
    wait_for_progress(peer, 100000)
    for _ in range(10):
        peer.send_signal(signal.SIGSTOP)
        stopped, stuck_since = time.monotonic(), None
        for status in status_lines(encode, 3.0):
            now = time.monotonic()
            if status["writes_in_data_plane"] == 0:
                stuck_since = None
            elif stuck_since is None:
                stuck_since = now
            if stuck_since is not None and now - stuck_since >= 1.0:
                return peer
            if now - stopped > 2.0:
                break
        peer.send_signal(signal.SIGCONT)
        wait_for_progress(peer, 100000)
    raise AssertionError("no write was ever caught in flight by the stop")


def interrupt_with_a_write_stuck(grace: str, twice: bool) -> tuple[subprocess.Popen, str, str, float]:
    """Ctrl-C (once, or twice: the second once the shutdown has begun) of a serve-encode whose
    peer is stopped with a write in the data plane; (process, stdout, stderr, seconds from the
    last Ctrl-C to the exit)."""
    encode, addr = start_encode("--status-every", "0.2", "--shutdown-grace", grace)
    peer = stop_with_a_write_stuck(encode, addr)
    try:
        encode.send_signal(signal.SIGINT)
        seen = ""
        if twice:
            while "shutting down" not in (line := encode.stderr.readline()):
                assert line, "serve-encode exited before shutting down"
            seen = line
            encode.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, err = encode.communicate(timeout=60)
        return encode, out, seen + err, time.monotonic() - interrupted
    finally:
        peer.kill()
        peer.communicate(timeout=30)


def test_ctrl_c_of_the_encode_side_with_a_stopped_peer_exits_within_5_s():
    """A write to a SIGSTOPped peer cannot be interrupted (Mooncake waits its own timeout):
    shutdown gives it the grace, abandons it, says so, and exits."""
    encode, out, err, took = interrupt_with_a_write_stuck("2", twice=False)
    assert encode.returncode == 0, err
    summary = summary_of(out)
    assert took < 5.0, f"shutdown took {took:.2f} s"
    assert summary["abandoned_writes"] >= 1 and summary["shutdown_seconds"] <= 2.0 + 0.5, summary
    assert "writes in the data plane, given up to 2 s" in err, err
    print(f"[operating] Ctrl-C of serve-encode with a stopped peer: exited in {took:.2f} s, "
          f"{summary['abandoned_writes']} write(s) abandoned")


def test_a_second_ctrl_c_of_the_encode_side_exits_at_once():
    encode, _, err, took = interrupt_with_a_write_stuck("60", twice=True)
    assert "given up to 60 s" in err, err
    assert encode.returncode == 130 and "interrupted again, exiting now" in err, err
    assert took < 1.0, f"the second Ctrl-C took {took:.2f} s"
    print(f"[operating] second Ctrl-C of serve-encode (grace 60 s, a write stuck): exited in {took:.2f} s")


GLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ", re.M)  # Mooncake's own (glog) lines


def test_each_failed_room_is_logged_once_on_both_sides_with_its_reason_and_mooncake_stays_quiet():
    encode, addr = start_encode()
    try:
        process = language(addr, 12, "--no-progress", "--abort-every", "3")  # rooms 2, 5, 8, 11 aborted
        _, err = process.communicate(timeout=120)
        assert process.returncode == 1, err
    finally:
        encode.send_signal(signal.SIGINT)
        out, encode_err = encode.communicate(timeout=30)
    aborted = [2, 5, 8, 11]
    logged = sorted(int(room) for room in re.findall(r"embxfer language0: room (\d+) failed in round \d+: ", err))
    assert logged == aborted, err
    # the encode side heard of each abort (a room it had not started yet is ended before any round)
    logged = sorted(int(room) for room in re.findall(r"embxfer encode: room (\d+) failed in round \d+: aborted by receiver rank 0",
                                                    encode_err))
    assert set(logged) <= set(aborted) and len(logged) == len(set(logged)) == summary_of(out)["failed"], encode_err
    assert not GLOG_LINE.search(err) and not GLOG_LINE.search(encode_err), (err, encode_err)


def test_verbose_shows_every_room_and_mooncakes_own_lines():
    encode, addr = start_encode()
    try:
        process = language(addr, 3, "--no-progress", "--verbose")
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    finally:
        stop_encode(encode)
    assert len(re.findall(r"embxfer language0: room \d+ succeeded in round \d+", err)) == 3, err
    assert GLOG_LINE.search(err), err
