"""``embxfer demo`` on real wires: spawn serve-encode and serve-language processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any

from embxfer.core import Settings
from embxfer.transports.auth import AuthKeys, write_keys
from embxfer.transports.mooncake import MooncakeEngine, MooncakeUnavailable
from embxfer.transports.nixl import NixlUnavailable, load_nixl

from .settings_flags import settings_args


DATA_PLANE_NAMES = {"mooncake": "Mooncake TCP", "zmq": "zero-copy ZeroMQ (CURVE)", "shm": "shared-memory",
                    "auto": "shared memory on one host, else Mooncake TCP", "nixl": "NIXL (UCX)"}


def run_two_process_demo(settings: Settings, rooms: int, in_flight: int, receivers: int, seed: int,
                         verbose: bool) -> dict[str, Any] | None:
    """Returns the summary, or None (after saying why in one line) when Mooncake is missing."""
    if settings.data_plane in ("mooncake", "auto"):
        try:
            MooncakeEngine(verbose=verbose)  # fail fast, in this process, before spawning anything
        except MooncakeUnavailable as error:
            print(f"embxfer: {error}", file=sys.stderr)
            print("embxfer: falling back to --transport loopback (both sides simulated in this process)", file=sys.stderr)
            return None
    if settings.data_plane == "nixl":
        try:
            load_nixl(verbose)  # fail fast, before spawning anything
        except NixlUnavailable as error:
            print(f"embxfer: {error}", file=sys.stderr)
            print("embxfer: falling back to --transport loopback (both sides simulated in this process)", file=sys.stderr)
            return None
    cli = [sys.executable, "-m", "embxfer.adapters.cli"]
    # the demo authenticates its sockets as a deployment would: a fresh keys file for this run
    keys_dir = tempfile.TemporaryDirectory(prefix="embxfer-demo-")
    keys_path = os.path.join(keys_dir.name, "demo.keys")
    write_keys(keys_path, AuthKeys.generate())
    extra = ["--auth-keys", keys_path, *(["--verbose"] if verbose else [])]
    encode = subprocess.Popen(
        [*cli, "serve-encode", "--bootstrap-port", "0", "--synthetic-seed", str(seed), "--json", "--no-progress",
         *settings_args(settings), *extra],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert encode.stdout is not None
        ready = encode.stdout.readline()
        if "ready on" not in ready:
            raise RuntimeError(f"serve-encode did not start: {ready!r}")
        addr = ready.split("ready on ", 1)[1].split()[0]
        languages = [
            subprocess.Popen(
                [*cli, "serve-language", "--bootstrap-addr", addr, "--requests", str(rooms), "--verify",
                 "--synthetic-seed", str(seed), "--in-flight", str(in_flight), "--rank", str(rank),
                 "--required-dst-info-num", str(receivers), "--json", "--no-progress", *settings_args(settings), *extra],
                stdout=subprocess.PIPE, text=True,
            )
            for rank in range(receivers)
        ]
        results = []
        for process in languages:
            out, _ = process.communicate(timeout=600)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if not lines:
                raise RuntimeError(f"serve-language exited {process.returncode} without a summary")
            results.append(json.loads(lines[-1]))
    finally:
        encode.send_signal(signal.SIGINT)
        try:
            encode_out, _ = encode.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            encode.kill()
            encode_out = ""
        keys_dir.cleanup()
    encode_lines = [ln for ln in (encode_out or "").splitlines() if ln.startswith("{")]
    encode_summary = json.loads(encode_lines[-1]) if encode_lines else {}
    rounds: Counter[int] = Counter()
    for result in results:
        for key, count in result["resume_rounds_histogram"].items():
            rounds[int(key)] += count
    seconds = max(r["seconds"] for r in results)
    return {
        "transport": f"ZeroMQ control (CURVE) + {DATA_PLANE_NAMES[settings.data_plane]}"
                     f" data ({1 + receivers} processes)",
        "rooms": rooms,
        "receivers": receivers,
        "succeeded": min(r["succeeded"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "failure_reasons": {k: v for r in results for k, v in r["failure_reasons"].items()},
        "wrong_rows": sum(r["wrong_rows"] for r in results),
        "resume_rounds_histogram": {str(k): rounds[k] for k in sorted(rounds)},
        "bytes": sum(r["bytes"] for r in results),
        "seconds": seconds,
        "pool_blocks": settings.pool_blocks,
        "leaked_blocks": sum(r["leaked_blocks"] for r in results),
        "sender_sources_held": encode_summary.get("sources_held", -1),
        "protocol_violations": [],
        "settings": {"block_size": settings.block_size, "default_blocks": settings.default_blocks,
                     "hidden_size": settings.hidden_size, "dtype": settings.dtype},
    }
