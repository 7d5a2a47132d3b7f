"""Two hosts: serve-encode and serve-language in two network namespaces joined by a veth pair.

The ends have 198.18.0.1/30 (encode) and 198.18.0.2/30 (language), from 198.18.0.0/15, the
range set aside for test networks; the namespaces hold nothing else, so every packet stays on
the pair (tests/netns_helpers.py builds and always removes them).  Scenarios:

* the link is cut (``ip link set … down``) mid-transfer: the rooms caught fail within their
  timeout and free every block; after the link is restored a new language process gets every
  room, verified, from the same encode process, which ends holding no source rows;
* the language side advertises a data-plane address the encode side cannot reach (no route;
  routed but silently dropped): its rooms fail within their timeout, nothing leaks;
* a receiver that advertises a blackholed address must not stall the encode side's writes
  to a healthy receiver (a peer that does not answer fails fast after its first slow write).

Needs root and iproute2 (``make system-deps``); where the machine refuses namespaces the
tests are skipped and the reason is printed on the terminal (not only in ``-rs``).
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import time
from typing import Any

import pytest

from netns_helpers import Proc, Refused, VethLink, ip, veth_link

TIMEOUTS = {"bootstrap": 5.0, "waiting": 3.0, "transfer": 3.0}
QUARANTINE = 12.0  # > bootstrap + waiting, as Settings asks
ENV = {
    "EMBXFER_BOOTSTRAP_TIMEOUT": str(TIMEOUTS["bootstrap"]),
    "EMBXFER_WAITING_TIMEOUT": str(TIMEOUTS["waiting"]),
    "EMBXFER_TRANSFER_TIMEOUT": str(TIMEOUTS["transfer"]),
    "EMBXFER_QUARANTINE_TIMEOUT": str(QUARANTINE),
}
# Small rows, a pool big enough for every room's first guess (12 x 2 blocks of 64), rooms that
# need 0, 1 and up to 30 resume rounds.
SETTINGS = ["--block-size", "16", "--default-blocks", "2", "--pool-blocks", "64", "--hidden-size", "256",
            "--dtype", "float32"]
SEED = "5"
# The caught rooms' room timers were last set before the cut; what comes after the deadline
# is the language loop noticing (it waits on one room at a time, 1 s at most each), closing
# its sockets and exiting.
SLACK = 4.0
DEATH_LIMIT = 5.0  # heartbeat_interval x heartbeat_misses (the defaults)
# encode -> language is rate-limited (tbf) so the first run's 7.6 MB take ~4 s: the cut, made
# as soon as the first room is reported done, lands while most rooms are still mid-transfer.
RATE = "16mbit"


def _say(config: pytest.Config, text: str) -> None:
    """Print on the terminal even under output capture, so CI logs show what ran (or why not)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        if reporter is not None:
            reporter.ensure_newline()
        for line in text.splitlines():
            if reporter is not None:
                reporter.write_line(f"[netns] {line}")
            else:
                print(f"[netns] {line}", file=sys.__stderr__, flush=True)


@pytest.fixture
def link(request: pytest.FixtureRequest) -> Any:
    try:
        with veth_link(ENV) as made:
            _say(request.config, f"{request.node.name}: namespaces {made.enc_ns} ({made.enc_ip}) <-> "
                                 f"{made.lang_ns} ({made.lang_ip}) over veth {made.enc_dev}/{made.lang_dev}")
            yield made
    except Refused as refusal:
        message = f"network namespaces unavailable here, test not run: {refusal}"
        _say(request.config, f"SKIPPED {request.node.name}: {message}")
        pytest.skip(message)


def start_encode(link: VethLink, *extra: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    encode = link.run("enc", "serve-encode", ["serve-encode", "--host", link.enc_ip, "--bootstrap-port", "0",
                                              "--synthetic-seed", SEED, "--json", "--no-progress", *SETTINGS, *extra],
                      env=env)
    match = encode.wait_for(lambda out: re.search(r"ready on (\S+)", out), key="out", timeout=120,
                            what="the 'ready on' line")
    addr = match.group(1)
    assert addr.startswith(f"{link.enc_ip}:"), addr
    return encode, addr


def start_language(link: VethLink, addr: str, requests: int, first_room: int, *, host: str | None = None,
                   progress: bool = False, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Proc:
    return link.run("lang", f"serve-language@{first_room}", [
        "serve-language", "--bootstrap-addr", addr, "--host", host or link.lang_ip, "--requests", str(requests),
        "--in-flight", str(requests), "--first-room", str(first_room), "--synthetic-seed", SEED, "--verify", "--json",
        *([] if progress else ["--no-progress"]), *SETTINGS, *extra,
    ], env=env)


def progress(requests: int) -> Any:
    """Reads serve-language's stderr bar: the highest 'k/requests' shown, -1 before the bar appears."""
    def shown(err: str) -> int:
        return max((int(k) for k in re.findall(rf"(\d+)/{requests}\b", err)), default=-1)
    return shown


def stop_encode(encode: Proc, timeout: float = 120.0) -> tuple[dict[str, Any], float]:
    assert encode.running(), f"serve-encode died:\n{encode.describe()}"
    started = time.monotonic()
    encode.popen.send_signal(signal.SIGINT)
    code = encode.wait(timeout)
    assert code == 0, encode.describe()
    return encode.summary(), time.monotonic() - started


def test_cut_link_mid_transfer_fails_caught_rooms_in_time_and_the_restored_link_serves(link: VethLink,
                                                                                      request: pytest.FixtureRequest):
    shaped = link.shape(RATE)
    encode, addr = start_encode(link)
    rooms = 12
    first = start_language(link, addr, rooms, 0, progress=True)
    # cut as soon as the first room is through (the bar counts finished rooms); the rest are in flight
    first.wait_for(lambda err: progress(rooms)(err) >= 1, timeout=120, what="a finished room")
    cut_at = link.cut()
    code = first.wait(timeout=max(TIMEOUTS.values()) + SLACK + 60)
    detected = first.exited_at - cut_at  # type: ignore[operator]
    summary = first.summary()
    _say(request.config, f"link {'rate-limited to ' + link.shaped if shaped else 'unshaped (no tbf here)'}: "
                         f"{summary['succeeded']} of {rooms} rooms succeeded, {summary['failed']} caught by the cut; "
                         f"the language process ended {detected:.2f} s after the cut; failures {summary['failure_reasons']}")
    assert code == 1, first.describe()
    assert summary["failed"] >= 1, f"the cut caught no room: {summary}"
    assert summary["succeeded"] >= 1 and summary["succeeded"] + summary["failed"] == rooms, summary
    assert summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0 and not summary["interrupted"], summary
    # every room had its first guess at init (the pool holds them all), so none was left in
    # Bootstrapping: each caught room was waiting or transferring, with a timer set before the cut
    assert detected <= max(TIMEOUTS["waiting"], TIMEOUTS["transfer"]) + SLACK, (detected, summary)

    link.restore()
    assert encode.running(), f"serve-encode died with the link:\n{encode.describe()}"
    # rank 0 is free for a new process once the encode side knows the old one is gone: its
    # goodbye may have been lost in the cut, and what TCP retransmits after the restore counts
    # as hearing from it, so a new process may be refused ("held by a live language process")
    # until the old one's silence passes the heartbeat limit; as a supervisor would, start again
    refused_until = time.monotonic() + 2 * DEATH_LIMIT + SLACK
    while True:
        again = start_language(link, addr, 6, 1000)
        code = again.wait(timeout=120)
        if code != 2 or "is held by a live language process" not in again.text["err"]:
            break
        assert time.monotonic() < refused_until, again.describe()
    second = again.summary()
    assert code == 0, again.describe()
    assert second["succeeded"] == 6 and second["failed"] == 0 and second["wrong_rows"] == 0, second
    assert second["verified"] and second["leaked_blocks"] == 0, second

    encode_summary, stop_seconds = stop_encode(encode)
    _say(request.config, f"after the restore 6/6 rooms verified; serve-encode stopped in {stop_seconds:.2f} s: {encode_summary}")
    # the encode side ended the caught rooms on its own (none left for Ctrl-C) and holds nothing
    assert encode_summary["sources_held"] == 0 and encode_summary["failed_at_shutdown"] == 0, encode_summary
    assert encode_summary["succeeded"] >= summary["succeeded"] + 6, encode_summary
    # the rows went over the veth pair (its counters), not some other path
    assert link.bytes_sent("enc") >= summary["bytes"] + second["bytes"]


# The language side's data-plane address (serve-language --host), which Mooncake advertises
# to the encode side, cannot be reached from the encode namespace:
#   unroutable: an address of the language host (on its lo), but the encode side has no route;
#   blackholed: the encode side routes it over the veth, the language host does not own it and
#               does not forward, so SYNs vanish without an answer (connect hangs).
UNREACHABLE = {
    "unroutable": ("198.19.0.2", [("lang", ["addr", "add", "198.19.0.2/32", "dev", "lo"])]),
    "blackholed": ("198.19.1.9", [("enc", ["route", "add", "198.19.1.0/24", "via", "198.18.0.2"])]),
}


def test_unreachable_data_plane_addresses_fail_rooms_in_time_and_free_everything(link: VethLink,
                                                                                 request: pytest.FixtureRequest):
    for host, setup in UNREACHABLE.values():
        for side, args in setup:
            ip("-n", link.enc_ns if side == "enc" else link.lang_ns, *args)
    encode, addr = start_encode(link)
    # a write to the blackholed address waits out the handshake connect timeout: keep it to one room
    for run, (kind, rooms) in enumerate((("unroutable", 3), ("blackholed", 1))):
        host = UNREACHABLE[kind][0]
        language = start_language(link, addr, rooms, 100 * run, host=host, progress=True)
        # the bar appears once the language side has registered; the rooms are initialised right after
        language.wait_for(lambda err: progress(rooms)(err) >= 0, timeout=120, what="registration (the progress bar)")
        registered_at = time.monotonic()
        code = language.wait(timeout=max(TIMEOUTS.values()) + SLACK + 60)
        took = language.exited_at - registered_at  # type: ignore[operator]
        summary = language.summary()
        _say(request.config, f"{kind} data-plane address {host}: {summary['failed']}/{rooms} rooms failed, the language "
                             f"process ended {took:.2f} s after registering; failures {summary['failure_reasons']}")
        assert code == 1, language.describe()
        assert summary["failed"] == rooms and summary["succeeded"] == 0, summary
        assert summary["leaked_blocks"] == 0 and summary["wrong_rows"] == 0, summary
        assert took <= max(TIMEOUTS.values()) + SLACK, (took, summary)
        assert encode.running(), f"serve-encode died:\n{encode.describe()}"

    encode_summary, stop_seconds = stop_encode(encode)
    _say(request.config, f"serve-encode stopped in {stop_seconds:.2f} s: {encode_summary}")
    assert encode_summary["sources_held"] == 0 and encode_summary["failed"] == 4, encode_summary


def test_a_blackholed_receiver_does_not_stall_writes_to_a_healthy_one(link: VethLink, request: pytest.FixtureRequest):
    host, setup = UNREACHABLE["blackholed"]
    for side, args in setup:
        ip("-n", link.enc_ns if side == "enc" else link.lang_ns, *args)
    encode, addr = start_encode(link)
    bad = start_language(link, addr, 4, 0, host=host)
    assert bad.wait(timeout=120) == 1
    healthy = start_language(link, addr, 3, 100)
    code = healthy.wait(timeout=120)
    summary = healthy.summary()
    _say(request.config, f"healthy receiver right after a blackholed one: {summary['succeeded']}/3 succeeded, "
                         f"failures {summary['failure_reasons']}")
    assert code == 0 and summary["succeeded"] == 3, summary


# NIXL: the language side's UCX advertises the addresses of the devices UCX_NET_DEVICES names.
# It is given a veth pair of its own inside the language namespace (both ends there), with
# 198.19.1.9 on one end, and advertises only that; the encode side routes 198.19.1.0/24 over the
# link, and the language host drops whatever arrives for it from the link (a policy-routing
# blackhole ahead of the local table): SYNs vanish without an answer.  UCX_TLS=tcp keeps UCX
# off the shared-memory transports two namespaces of one host would share.
NIXL_BLACKHOLE = "198.19.1.9"
NIXL_ENV = {"UCX_TLS": "tcp"}


def _blackhole_nixl_address(link: VethLink) -> str:
    """The device UCX_NET_DEVICES names on the language side."""
    device, other = f"{link.lang_dev}b", f"{link.lang_dev}c"
    ip("-n", link.lang_ns, "link", "add", device, "type", "veth", "peer", "name", other)
    ip("-n", link.lang_ns, "addr", "add", f"{NIXL_BLACKHOLE}/32", "dev", device)
    for end in (device, other):
        ip("-n", link.lang_ns, "link", "set", end, "up")
    ip("-n", link.lang_ns, "rule", "add", "pref", "100", "lookup", "local")
    ip("-n", link.lang_ns, "rule", "del", "pref", "0")
    ip("-n", link.lang_ns, "rule", "add", "pref", "10", "iif", link.lang_dev, "to", NIXL_BLACKHOLE, "blackhole")
    ip("-n", link.enc_ns, "route", "add", "198.19.1.0/24", "via", link.lang_ip)
    return device


def test_a_blackholed_nixl_receiver_fails_its_rooms_in_time_and_a_healthy_one_is_served(
        link: VethLink, request: pytest.FixtureRequest):
    from conftest import require_plane

    require_plane("nixl")
    device = _blackhole_nixl_address(link)
    nixl = ("--data-plane", "nixl")
    encode, addr = start_encode(link, *nixl, env=NIXL_ENV)
    rooms = 3
    bad = start_language(link, addr, rooms, 0, progress=True, extra=nixl, env={**NIXL_ENV, "UCX_NET_DEVICES": device})
    bad.wait_for(lambda err: progress(rooms)(err) >= 0, timeout=120, what="registration (the progress bar)")
    registered_at = time.monotonic()
    code = bad.wait(timeout=max(TIMEOUTS.values()) + SLACK + 60)
    took = bad.exited_at - registered_at  # type: ignore[operator]
    summary = bad.summary()
    _say(request.config, f"NIXL receiver advertising blackholed {NIXL_BLACKHOLE}: {summary['failed']}/{rooms} rooms "
                         f"failed, the language process ended {took:.2f} s after registering; failures "
                         f"{summary['failure_reasons']}")
    assert code == 1, bad.describe()
    assert summary["failed"] == rooms and summary["leaked_blocks"] == 0 and summary["wrong_rows"] == 0, summary
    assert took <= max(TIMEOUTS.values()) + SLACK, (took, summary)
    assert encode.running(), f"serve-encode died:\n{encode.describe()}"

    healthy = start_language(link, addr, 3, 100, extra=nixl, env=NIXL_ENV)
    code = healthy.wait(timeout=120)
    second = healthy.summary()
    _say(request.config, f"healthy NIXL receiver right after: {second['succeeded']}/3 succeeded, "
                         f"failures {second['failure_reasons']}")
    assert code == 0 and second["succeeded"] == 3 and second["verified"], healthy.describe()
    encode_summary, stop_seconds = stop_encode(encode)
    _say(request.config, f"serve-encode stopped in {stop_seconds:.2f} s: {encode_summary}")
    assert encode_summary["sources_held"] == 0, encode_summary
