"""``embxfer bench``: speed as ratios against baselines measured in the same run.

Data-plane case: one room of N MB of embedding rows (bf16, hidden 1024, plus fill ids and
mrope positions) through embxfer over ZeroMQ + Mooncake TCP (in one process, real sockets
and engine), with R resume rounds, against a raw ``transfer_sync_write`` of the same bytes
and a memcpy of the same bytes.  Each figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from embxfer.core import Poll, Settings

from .workload import room_data

HIDDEN = 1024
ROW_BYTES = HIDDEN * 2 + 8 + 24  # bf16 row + fill id + 3 mrope positions


def _settings_for(tokens: int, resumes: int) -> Settings:
    block = 128
    blocks = -(-tokens // block)
    per_round = -(-blocks // (resumes + 1))  # the default guess holds one round's share
    return Settings(block_size=block, default_blocks=per_round, pool_blocks=max(per_round, 1) * 2,
                    hidden_size=HIDDEN, dtype="bfloat16", bootstrap_timeout=120, waiting_timeout=120, transfer_timeout=120)


def embxfer_seconds(megabytes: int, resumes: int, repeat: int) -> tuple[float, int, int]:
    from ._local import connect_local

    tokens = megabytes * (1 << 20) // (HIDDEN * 2)
    settings = _settings_for(tokens, resumes)
    data = room_data(3, 0, settings, num_tokens=tokens)
    times = []
    rounds_seen = -1
    with connect_local(settings) as link:
        rx = link.receivers[0]
        for attempt in range(repeat + 1):  # the first run warms the engine's connection up
            room = 1000 + attempt
            started = time.perf_counter()
            rx.init(room)
            link.sender.send(room, data)
            state = rx.wait(room, timeout=120)
            elapsed = time.perf_counter() - started
            assert state == Poll.Success, rx.failure(room)
            result = rx.take(room)
            if attempt == 0:
                assert result.same_bytes(data), "bench rows differ"
                rounds_seen = max(int(k.split(":")[1]) for k in rx.stats() if k.startswith("resume_rounds:"))
            else:
                times.append(elapsed)
            link.sender.forget(room)
    return statistics.median(times), tokens * ROW_BYTES, rounds_seen


def raw_mooncake_seconds(nbytes: int, repeat: int) -> float:
    from embxfer.transports.mooncake import MooncakeEngine

    a, b = MooncakeEngine(), MooncakeEngine()
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    a.register(src)
    b.register(dst)
    times = []
    for attempt in range(repeat + 1):
        started = time.perf_counter()
        rc = a.engine.transfer_sync_write(b.session_id, src.data_ptr(), dst.data_ptr(), nbytes)
        elapsed = time.perf_counter() - started
        assert rc == 0, rc
        if attempt:
            times.append(elapsed)
    assert torch.equal(src, dst)
    return statistics.median(times)


def memcpy_seconds(nbytes: int, repeat: int) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for attempt in range(repeat + 1):
        started = time.perf_counter()
        dst.copy_(src)
        if attempt:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(sizes: list[int], resumes: list[int], repeat: int) -> dict[str, Any]:
    rows = []
    for megabytes in sizes:
        for resume in resumes:
            seconds, nbytes, rounds_seen = embxfer_seconds(megabytes, resume, repeat)
            raw = raw_mooncake_seconds(nbytes, repeat)
            copy = memcpy_seconds(nbytes, repeat)
            rows.append({
                "case": "data-plane", "megabytes": megabytes, "resume_rounds": rounds_seen, "bytes": nbytes,
                "embxfer_mb_s": round(nbytes / seconds / 1e6, 1),
                "raw_mooncake_mb_s": round(nbytes / raw / 1e6, 1),
                "memcpy_mb_s": round(nbytes / copy / 1e6, 1),
                "embxfer_vs_raw": round(raw / seconds, 3),
            })
            print(f"  {megabytes:>3} MB, {rounds_seen} resume(s): embxfer {rows[-1]['embxfer_mb_s']:>8} MB/s   "
                  f"raw transfer_sync_write {rows[-1]['raw_mooncake_mb_s']:>8} MB/s   memcpy {rows[-1]['memcpy_mb_s']:>9} MB/s   "
                  f"embxfer/raw {rows[-1]['embxfer_vs_raw']:.2f}", flush=True)
    return {"machine": {"cpus": torch.get_num_threads()}, "repeat": repeat, "data_plane": rows}


def main(args: argparse.Namespace) -> int:
    print(f"embxfer bench — data plane over ZeroMQ + Mooncake TCP on 127.0.0.1, median of {args.repeat}", flush=True)
    result = run(args.sizes, args.resumes, args.repeat)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="measure throughput against raw Mooncake writes and memcpy")
    bench.add_argument("--sizes", type=int, nargs="+", default=[16], help="megabytes of embedding rows")
    bench.add_argument("--resumes", type=int, nargs="+", default=[1], help="resume rounds to force")
    bench.add_argument("--repeat", type=int, default=5)
    bench.add_argument("--json", default="", help="write the results to this file")
