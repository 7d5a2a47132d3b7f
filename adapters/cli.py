"""The ``embxfer`` command line: ``demo`` and ``diagram``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

from embxfer.core import Poll, ProtocolError, Settings

from ._loopback import connect_loopback
from .workload import room_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embxfer", description="Resumable embedding transfer")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a verified workload of rooms end to end")
    demo.add_argument("--transport", choices=["loopback"], default="loopback",
                      help="loopback: sender and receivers simulated in this process")
    demo.add_argument("--rooms", type=int, default=36, help="rooms to transfer (default 36)")
    demo.add_argument("--in-flight", type=int, default=6, help="rooms in flight at once (default 6)")
    demo.add_argument("--receivers", type=int, default=1, help="receiver ranks (required_dst_info_num)")
    demo.add_argument("--pool-blocks", type=int, default=24, help="receiver pool, in blocks (small to force resumes)")
    demo.add_argument("--hidden-size", type=int, default=256)
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")

    diagram = commands.add_parser("diagram", help="print the mermaid state diagrams")
    diagram.add_argument("--write", action="store_true", help="rewrite specs/diagrams/*.mmd")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        return _diagram(args)
    except ProtocolError as error:
        print(f"embxfer: {error}", file=sys.stderr)
        return 2


def _diagram(args: argparse.Namespace) -> int:
    from embxfer.specs import diagrams
    from embxfer.specs.tables import TABLES

    if args.write:
        for path in diagrams.write_all():
            print(f"wrote {path}")
        return 0
    for role in TABLES:
        print(f"%% {role}")
        print(diagrams.mermaid(role))
    return 0


def _demo(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        pool_blocks=args.pool_blocks, hidden_size=args.hidden_size, dtype=args.dtype,
    )
    summary = run_loopback_workload(settings, args.rooms, args.in_flight, args.receivers, args.seed)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)
    ok = not (summary["failed"] or summary["wrong_rows"] or summary["leaked_blocks"] or summary["protocol_violations"])
    return 0 if ok else 1


def run_loopback_workload(settings: Settings, rooms: int, in_flight: int, receivers: int, seed: int) -> dict[str, Any]:
    """Transfer ``rooms`` synthetic rooms, ``in_flight`` at a time, and verify every row."""
    link = connect_loopback(settings, receivers=receivers)
    started = time.perf_counter()
    next_room = 0
    active: dict[int, Any] = {}
    succeeded = failed = wrong = 0
    failures: Counter[str] = Counter()
    byte_count = 0
    while next_room < rooms or active:
        while next_room < rooms and len(active) < max(1, in_flight):
            data = room_data(seed, next_room, settings)
            for rx in link.receivers:
                rx.init(next_room)
            link.sender.send(next_room, data)
            active[next_room] = data
            next_room += 1
        link.run_until_idle()
        for room in list(active):
            states = [rx.poll(room) for rx in link.receivers]
            if all(s == Poll.Success for s in states):
                data = active.pop(room)
                for rx in link.receivers:
                    if not rx.take(room).same_bytes(data):
                        wrong += 1
                byte_count += receivers * (data.embeddings.numel() * data.embeddings.element_size() + data.num_tokens * 8 * 4)
                succeeded += 1
                link.sender.endpoint.forget(room)
            elif any(s == Poll.Failed for s in states):
                active.pop(room)
                failed += 1
                failures.update(rx.failure(room) for rx in link.receivers if rx.failure(room))
        if active and not link.network.pending:
            deadline = link.next_deadline()  # nothing in flight: only time can move things
            if deadline is None:
                break
            link.advance(max(0.0, deadline - link.now))
    elapsed = time.perf_counter() - started
    rounds: Counter[int] = Counter()
    for rx in link.receivers:
        for key, count in rx.endpoint.stats.items():
            if key.startswith("resume_rounds:"):
                rounds[int(key.split(":")[1])] += count
    free = link.free_blocks()
    return {
        "transport": "loopback",
        "rooms": rooms,
        "receivers": receivers,
        "succeeded": succeeded,
        "failed": failed,
        "failure_reasons": dict(failures),
        "wrong_rows": wrong,
        "resume_rounds_histogram": {str(k): rounds[k] for k in sorted(rounds)},
        "bytes": byte_count,
        "seconds": round(elapsed, 4),
        "pool_blocks": settings.pool_blocks,
        "leaked_blocks": sum(settings.pool_blocks - f for f in free["receivers"]),
        "sender_sources_held": free["sender_sources_held"],
        "protocol_violations": link.violations(),
        "settings": {"block_size": settings.block_size, "default_blocks": settings.default_blocks,
                     "hidden_size": settings.hidden_size, "dtype": settings.dtype},
    }


def _print_summary(summary: dict[str, Any]) -> None:
    s = summary["settings"]
    print(f"embxfer demo — transport {summary['transport']}, {summary['receivers']} receiver rank(s), "
          f"pool {summary['pool_blocks']} blocks x {s['block_size']} tokens, default guess {s['default_blocks']} blocks, "
          f"hidden {s['hidden_size']} {s['dtype']}")
    print(f"  rooms        {summary['rooms']}: {summary['succeeded']} succeeded, {summary['failed']} failed")
    print("  resume rounds per room:")
    for rounds, count in summary["resume_rounds_histogram"].items():
        print(f"    {rounds:>3} round(s)  {count:>4} room-rank(s)")
    mb = summary["bytes"] / 1e6
    print(f"  bytes        {mb:.1f} MB in {summary['seconds']:.3f} s")
    print(f"  wrong rows   {summary['wrong_rows']}")
    print(f"  leaked blocks {summary['leaked_blocks']}, sources still held {summary['sender_sources_held']}")
    if summary["failure_reasons"]:
        print("  failures:", summary["failure_reasons"])
    verdict = "OK" if summary["failed"] == 0 and summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0 else "FAILED"
    print(f"  result       {verdict}")


if __name__ == "__main__":
    sys.exit(main())
