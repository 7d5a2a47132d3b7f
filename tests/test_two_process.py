"""The encode and language sides as separate processes, through the CLI, on 127.0.0.1.

Ports: serve-encode binds port 0 and prints the one it got; nothing is hard-coded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys


CLI = [sys.executable, "-m", "embxfer.adapters.cli"]
SETTINGS = ["--block-size", "16", "--default-blocks", "4", "--pool-blocks", "12", "--hidden-size", "32", "--dtype", "float16"]


def start_encode(*extra: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [*CLI, "serve-encode", "--bootstrap-port", "0", "--synthetic-seed", "5", "--json", "--no-progress", *SETTINGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    assert "ready on" in line, line + process.stderr.read()
    return process, line.split("ready on ", 1)[1].split()[0]


def stop_encode(process: subprocess.Popen) -> dict:
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def language(addr: str, requests: int, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "serve-language", "--bootstrap-addr", addr, "--requests", str(requests), "--verify",
         "--synthetic-seed", "5", "--json", *SETTINGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def summary_of(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def test_two_processes_verify_every_row_over_0_1_and_many_rounds():
    encode, addr = start_encode()
    try:
        process = language(addr, 30, "--no-progress")
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        summary = summary_of(out)
        assert summary["succeeded"] == 30 and summary["failed"] == 0 and summary["wrong_rows"] == 0
        assert summary["leaked_blocks"] == 0
        rounds = {int(k) for k in summary["resume_rounds_histogram"]}
        assert {0, 1} <= rounds and max(rounds) >= 2
    finally:
        encode_summary = stop_encode(encode)
    assert encode_summary["succeeded"] == 30 and encode_summary["sources_held"] == 0


def test_fan_out_to_two_language_processes():
    encode, addr = start_encode()
    try:
        ranks = [language(addr, 12, "--no-progress", "--rank", str(r), "--required-dst-info-num", "2") for r in (0, 1)]
        for process in ranks:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            summary = summary_of(out)
            assert summary["succeeded"] == 12 and summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0
    finally:
        encode_summary = stop_encode(encode)
    assert encode_summary["succeeded"] == 12 and encode_summary["sources_held"] == 0


def interrupt_mid_run(process: subprocess.Popen, requests: int) -> tuple[str, str]:
    """Wait for the progress bar to show rooms completing, then Ctrl-C; (stdout, stderr)."""
    seen = ""
    while not any(int(n) > 0 for n in re.findall(rf"(\d+)/{requests}", seen)):
        chunk = process.stderr.read(1)
        assert chunk, "serve-language ended before showing progress"
        seen += chunk
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return out, seen + err


def test_ctrl_c_on_the_language_side_fails_rooms_with_shutdown_and_frees_blocks():
    encode, addr = start_encode()
    try:
        process = language(addr, 100000, "--in-flight", "8")
        out, err = interrupt_mid_run(process, 100000)
        summary = summary_of(out)
        assert summary["interrupted"] and summary["leaked_blocks"] == 0 and summary["wrong_rows"] == 0
        assert 0 < summary["succeeded"] < 100000 and process.returncode == 1
        # honest counts: what never started is not a failure; what was in flight was cut by the shutdown
        assert summary["started"] + summary["not_started"] == 100000 and summary["not_started"] > 0, summary
        assert summary["succeeded"] + summary["failed"] + summary["in_flight_at_interrupt"] == summary["started"]
        assert summary["failed"] == 0 and summary["in_flight_at_interrupt"] <= 8, summary
        # the encode side keeps serving: a new language process succeeds
        again = language(addr, 6, "--no-progress", "--first-room", "200000")
        out, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
    finally:
        encode_summary = stop_encode(encode)
    # rooms the language side abandoned were aborted ("shutdown") and the encode side let go
    assert encode_summary["sources_held"] == 0
    assert encode_summary["failed"] <= summary["aborted_at_shutdown"]


def test_an_interrupted_text_summary_says_so_and_counts_what_never_started():
    encode, addr = start_encode()
    try:
        process = subprocess.Popen(
            [*CLI, "serve-language", "--bootstrap-addr", addr, "--requests", "100000", "--in-flight", "8",
             "--synthetic-seed", "5", *SETTINGS],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        out, err = interrupt_mid_run(process, 100000)
        line = next(line for line in out.splitlines() if line.startswith("embxfer serve-language"))
        started, succeeded, failed, in_flight, not_started = map(int, re.search(
            r"interrupted: (\d+) of 100000 rooms started, (\d+) succeeded, (\d+) failed, (\d+) in flight "
            r"\(aborted at shutdown\), (\d+) not started", line).groups())
        assert started + not_started == 100000 and succeeded + failed + in_flight == started and not_started > 0
        assert process.returncode == 1, err[-3000:]
    finally:
        stop_encode(encode)


def test_ctrl_c_while_connecting_exits_at_once():
    import socket
    import time

    with socket.socket() as probe:  # a port where nothing answers
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [*CLI, "serve-language", "--bootstrap-addr", f"127.0.0.1:{port}", "--requests", "5", *SETTINGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stderr.readline()
    assert "registering with" in line, line
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 1.0, "Ctrl-C during connect took too long"
    assert process.returncode == 130 and "interrupted while connecting" in err, err


def test_language_side_says_clearly_when_no_encode_server_answers():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listened on: nobody answers there
        env = {**os.environ, "EMBXFER_BOOTSTRAP_TIMEOUT": "1"}
        process = language(f"127.0.0.1:{port}", 1, "--no-progress", env=env)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"no encode server answered at 127.0.0.1:{port}" in err
