"""A language side whose configuration the encode side cannot serve fails at once, with
both values in its message, through the real CLIs (the codec decodes, the core judges:
the encode side refuses the registration with a reason, the language side prints it).

Before: a Register with another block size was an undecodable frame on the encode side,
and the language side waited the whole bootstrap timeout (30 s) and then said only that
no encode server answered."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "embxfer.adapters.cli"]
REGISTERING = "registering with"
LIMIT = 2.0  # seconds from the language side's registration to its exit


@pytest.fixture
def encode_server():
    servers: list[subprocess.Popen] = []

    def start(*flags: str) -> str:
        process = subprocess.Popen(
            [*CLI, "serve-encode", "--bootstrap-port", "0", "--no-progress", "--data-plane", "zmq", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        servers.append(process)
        line = process.stdout.readline()
        assert "ready on" in line, line + process.stderr.read()
        return line.split("ready on ")[1].split()[0]

    yield start
    for process in servers:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(("encode_flags", "language_flags", "field", "encode_value", "language_value"), [
    (["--block-size", "64"], [], "block_size", "64", "128"),
    (["--hidden-size", "512"], [], "hidden_size", "512", "256"),
    (["--dtype", "float16"], [], "dtype", "float16", "bfloat16"),
    ([], ["--data-plane", "mooncake"], "data_plane", "zmq", "mooncake"),
    # the issue's own case: both sides on the default data plane (Mooncake), block sizes differ
    (["--data-plane", "mooncake", "--block-size", "64"], ["--data-plane", "mooncake"], "block_size", "64", "128"),
])
def test_language_side_exits_at_once_naming_both_values(encode_server, encode_flags, language_flags, field,
                                                        encode_value, language_value):
    address = encode_server(*encode_flags)
    language = subprocess.Popen(
        [*CLI, "serve-language", "--bootstrap-addr", address, "--requests", "3", "--no-progress",
         "--data-plane", "zmq", *language_flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = language.stderr.readline()  # printed just before it registers
    assert REGISTERING in line, line + language.stderr.read()
    registering = time.monotonic()
    code = language.wait(timeout=30)
    elapsed = time.monotonic() - registering
    message = language.stderr.read()
    print(f"[mismatch] {field}: exit {code} {elapsed:.2f} s after registering: {message.strip()}")
    assert code != 0
    assert f"encode side has {field} {encode_value}, language side {language_value}" in message
    assert address in message
    assert elapsed < LIMIT
