"""Soak: 100,000 small rooms through one encode and one language process over Mooncake
(20,000 over the zmq plane), with a mix of successes, aborts and timeouts.  At the end every
room table, tombstone set and quarantine is empty or within its bound, and the resident
memory of both processes after the first 10,000 rooms grows by less than 10%.

``EMBXFER_SOAK_ROOMS`` scales it (e.g. 20000 for a quick run); CI runs the full size."""

from __future__ import annotations

import json
import re
import os
import subprocess

import pytest

from test_two_process import CLI, SETTINGS as CLI_SETTINGS, summary_of

SCALE = int(os.environ.get("EMBXFER_SOAK_ROOMS", "100000"))
ABORT_EVERY = 37  # the language side aborts these rooms right after their init
SKIP_EVERY = 200  # the encode side never sends these rooms: they time out
TIMING = ["--bootstrap-timeout", "4", "--waiting-timeout", "0.5", "--transfer-timeout", "4", "--quarantine-timeout", "6"]
RETIRED_BOUND = 1 << 15  # tombstones kept per endpoint (by count)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize(("plane", "rooms"), [("mooncake", SCALE), ("zmq", max(10_000, SCALE // 5))])
def test_soak_many_rooms_flat_memory_and_empty_tables(plane, rooms, tmp_path):
    report = 10_000 if rooms >= 20_000 else rooms // 2
    # stderr to files: each failed room is logged (rate-limited), and nothing reads a pipe until the end
    encode_log, language_log = open(tmp_path / "encode.stderr", "w+"), open(tmp_path / "language.stderr", "w+")
    encode = subprocess.Popen(
        [*CLI, "serve-encode", "--bootstrap-port", "0", "--synthetic-seed", "5", "--skip-every", str(SKIP_EVERY),
         "--json", "--no-progress", "--data-plane", plane, *CLI_SETTINGS, *TIMING],
        stdout=subprocess.PIPE, stderr=encode_log, text=True,
    )
    try:
        line = encode.stdout.readline()
        assert "ready on" in line, line + encode_log.read()
        addr = line.split("ready on ", 1)[1].split()[0]
        language = subprocess.Popen(
            [*CLI, "serve-language", "--bootstrap-addr", addr, "--requests", str(rooms), "--in-flight", "32",
             "--verify", "--synthetic-seed", "5", "--abort-every", str(ABORT_EVERY), "--report-every", str(report),
             "--json", "--no-progress", "--data-plane", plane, *CLI_SETTINGS, *TIMING],
            stdout=subprocess.PIPE, stderr=language_log, text=True,
        )
        samples: list[tuple[int, float, float]] = []  # (rooms done, language RSS, encode RSS)
        lines = []
        for text in language.stdout:
            lines.append(text)
            if text.startswith('{"progress"'):
                progress = json.loads(text)
                samples.append((progress["progress"], progress["rss_mb"], rss_mb(encode.pid)))
        language.wait(timeout=60)
        summary = summary_of("".join(lines))
    finally:
        encode.send_signal(2)
        out, _ = encode.communicate(timeout=60)
    encode_summary = summary_of(out)
    # every failed room was logged on both sides, one line each or counted in a flood's left-out line
    for log, failed in ((encode_log, encode_summary["failed"]), (language_log, summary["failed"])):
        log.seek(0)
        text = log.read()
        each = text.count(" failed in round ")
        left_out = sum(int(n) for n in re.findall(r"(\d+) more rooms failed within", text))
        assert each > 0 and each + left_out == failed, (log.name, each, left_out, failed)
    first, last = samples[0], samples[-1]
    growth = (last[1] / first[1] - 1, last[2] / first[2] - 1)
    counters, enc = summary["counters"], encode_summary["counters"]
    print(f"[soak] {plane}: {rooms:,} rooms in {summary['seconds']:.0f} s: {summary['succeeded']:,} succeeded, "
          f"{summary['failed']:,} failed {summary['failure_reasons']}; RSS after {first[0]:,} rooms -> end: "
          f"language {first[1]:.0f} -> {last[1]:.0f} MB ({growth[0]:+.1%}), encode {first[2]:.0f} -> {last[2]:.0f} MB "
          f"({growth[1]:+.1%}); tables at the end: language {counters['room_records']} rooms, "
          f"{counters['tombstones']} tombstones, {summary['quarantined_at_exit']} quarantined blocks; encode "
          f"{enc['room_records']} rooms, {enc['tombstones']} tombstones, {encode_summary['sources_held']} sources")
    assert summary["succeeded"] + summary["failed"] == rooms and summary["wrong_rows"] == 0
    assert summary["succeeded"] > rooms * 0.9
    aborted = sum(n for reason, n in summary["failure_reasons"].items() if reason.startswith("aborted by receiver"))
    # a skipped room times out on whichever side's waiting_timeout ends first
    timed_out = sum(n for reason, n in summary["failure_reasons"].items() if "timeout in state" in reason)
    assert aborted > 0 and timed_out > 0 and aborted + timed_out == summary["failed"], summary["failure_reasons"]
    assert counters["room_records"] == 0 and counters["tombstones"] <= RETIRED_BOUND
    # an abort's blocks wait for the sender's ack (one round trip): the last few may still wait
    assert summary["quarantined_at_exit"] <= 2 * 4 and summary["leaked_blocks"] == 0
    assert enc["room_records"] == 0 and enc["tombstones"] <= RETIRED_BOUND and encode_summary["sources_held"] == 0
    assert growth[0] < 0.10 and growth[1] < 0.10, growth
