"""The ``embxfer`` command line: ``demo``, ``serve-encode``, ``serve-language``, ``keygen``, ``bench``, ``check``,
``diagram``."""

from __future__ import annotations

import argparse
import os
import json
import sys
import time
from collections import Counter
from typing import Any

from embxfer.core import Poll, ProtocolError, Settings

from . import bench as bench_parser
from ._auth_flags import add_auth_flags, add_keygen, keygen
from ._loopback import connect_loopback
from ._serve import add_settings_flags, serve_encode, serve_language
from ._spawn import run_two_process_demo
from .workload import room_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embxfer", description="Resumable embedding transfer")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a verified workload of rooms end to end")
    demo.add_argument("--transport", choices=["mooncake", "zmq", "shm", "auto", "nixl", "loopback"], default="mooncake",
                      help="mooncake (default): an encode and a language process over ZeroMQ + Mooncake TCP "
                           "on 127.0.0.1; zmq: the same processes with the zero-copy ZeroMQ data plane; "
                           "shm: with shared memory (the two processes share this host); auto: shared memory "
                           "where both ends share a host, else Mooncake; nixl: NIXL WRITEs over UCX "
                           "(pip install 'embxfer[nixl]'); "
                           "loopback: both sides simulated in this process")
    demo.add_argument("--verbose", action="store_true", help="show Mooncake's own log lines")
    demo.add_argument("--rooms", type=int, default=36, help="rooms to transfer (default 36)")
    demo.add_argument("--in-flight", type=int, default=6, help="rooms in flight at once (default 6)")
    demo.add_argument("--receivers", type=int, default=1, help="receiver ranks (required_dst_info_num)")
    demo.add_argument("--pool-blocks", type=int, default=24, help="receiver pool, in blocks (small to force resumes)")
    demo.add_argument("--hidden-size", type=int, default=256)
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--fork", action="store_true",
                      help="run the SGLang fork's own scheduler loops (re-created) over embxfer: two encode "
                           "servers, one language pool (--rooms requests)")

    encode = commands.add_parser("serve-encode", help="run the encode side (sender) until Ctrl-C")
    encode.add_argument("--bootstrap-port", type=int, default=8001, help="0 picks a free port (printed)")
    encode.add_argument("--host", default="127.0.0.1")
    encode.add_argument("--protocol", choices=["tcp", "rdma"], default="tcp")
    encode.add_argument("--device", dest="rdma_device", default="", help="RDMA device, e.g. mlx5_0 (the pool's device: --pool-device)")
    encode.add_argument("--synthetic-seed", type=int, default=None,
                        help="answer every room with deterministic synthetic rows")
    encode.add_argument("--skip-every", type=int, default=0, metavar="N",
                        help="with --synthetic-seed: never send every Nth room (its receiver times out; for soak tests)")
    encode.add_argument("--status-every", type=float, default=0, metavar="SECONDS",
                        help="print a JSON status line (rooms, writes in the data plane, memory) every SECONDS")
    encode.add_argument("--shutdown-grace", type=float, default=2.0, metavar="SECONDS",
                        help="at Ctrl-C, how long writes already in the data plane may take before they are "
                             "abandoned (default 2; a second Ctrl-C exits at once)")
    encode.add_argument("--json", action="store_true")
    encode.add_argument("--no-progress", action="store_true")
    encode.add_argument("--verbose", action="store_true")
    _add_metrics_flags(encode)
    add_auth_flags(encode)
    add_settings_flags(encode)

    language = commands.add_parser("serve-language", help="run the language side (receiver) for N rooms")
    language.add_argument("--bootstrap-addr", required=True, help="host:port of serve-encode")
    language.add_argument("--requests", type=int, required=True)
    language.add_argument("--verify", action="store_true", help="check every row against the synthetic seed")
    language.add_argument("--synthetic-seed", type=int, default=1)
    language.add_argument("--in-flight", type=int, default=32)
    language.add_argument("--first-room", type=int, default=0)
    language.add_argument("--rank", type=int, default=0)
    language.add_argument("--required-dst-info-num", type=int, default=1)
    language.add_argument("--host", default="127.0.0.1", help="this side's data-plane address")
    language.add_argument("--protocol", choices=["tcp", "rdma"], default="tcp")
    language.add_argument("--device", dest="rdma_device", default="", help="RDMA device, e.g. mlx5_0")
    language.add_argument("--abort-every", type=int, default=0, metavar="N",
                          help="abort every Nth room right after its init (for soak tests)")
    language.add_argument("--report-every", type=int, default=0, metavar="N",
                          help="print a JSON progress line (rooms done, resident memory) every N rooms")
    language.add_argument("--json", action="store_true")
    language.add_argument("--no-progress", action="store_true")
    language.add_argument("--verbose", action="store_true")
    _add_metrics_flags(language)
    add_auth_flags(language)
    add_keygen(commands)
    add_settings_flags(language)

    bench_parser.add_parser(commands)

    check = commands.add_parser(
        "check", help="explore every interleaving of the real core (bounded)",
        description="Breadth-first over every interleaving of the real Sender and Receiver: messages delivered in "
                    "any order within --max-delay, and up to the given number of drops, duplicates, aborts and "
                    "crashes; time jumps to the next deadline (timeouts) or latest arrival. Blocks of 2 tokens, a "
                    "default guess of 1 block: lengths 1-2 need no resume, 3-6 one, 7-10 two, 11-14 three with the "
                    "default 2-block pool.",
    )
    check.add_argument("--receivers", type=int, default=1, help="receiver ranks (required_dst_info_num), default 1")
    check.add_argument("--lengths", type=int, nargs="+", default=[5],
                       help="tokens per room, one room each (default: 5, one resume round)")
    check.add_argument("--pool-blocks", type=int, default=2,
                       help="receiver pool in 2-token blocks (default 2: two rooms wait for each other's blocks; "
                            "1 makes every init wait)")
    check.add_argument("--drops", type=int, default=1, help="messages or writes lost, at most (default 1)")
    check.add_argument("--duplicates", type=int, default=1, help="control messages delivered twice, at most (default 1)")
    check.add_argument("--aborts", type=int, default=1, help="aborts by either side, at most (default 1)")
    check.add_argument("--crashes", type=int, default=0, help="endpoints that stop for good, at most (default 0)")
    check.add_argument("--max-delay", type=float, default=10.0,
                       help="seconds a message or write may stay in flight, at most (default 10: a room timeout)")
    check.add_argument("--quarantine-timeout", type=float, default=45.0,
                       help="seconds a failed room's blocks stay quarantined (default 45; the protocol needs more than "
                            "bootstrap + waiting timeouts (10 + 10) + 2 x max delay)")
    check.add_argument("--depth", type=int, default=60, help="longest event sequence explored (default 60)")
    check.add_argument("--max-states", type=int, default=2_000_000, help="give up beyond this many states")

    diagram = commands.add_parser("diagram", help="print the mermaid state diagrams")
    diagram.add_argument("--write", action="store_true", help="rewrite specs/diagrams/*.mmd")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return bench_parser.main(args)
        if args.command == "check":
            return _check(args)
        if args.command == "keygen":
            return keygen(args)
        if args.command in ("serve-encode", "serve-language"):
            code = (serve_encode if args.command == "serve-encode" else serve_language)(args)
            # Mooncake's engine can abort the interpreter while it is torn down at exit
            # (and takes ~1 s doing it); the sockets are closed and the summary is out.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return _diagram(args)
    except ProtocolError as error:
        print(f"embxfer: {error}", file=sys.stderr)
        return 2


def _add_metrics_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port (0 picks one; needs embxfer[metrics])")
    parser.add_argument("--metrics-addr", default="127.0.0.1", help="address of the metrics port")


def _check(args: argparse.Namespace) -> int:
    from embxfer.specs.checker import Config, checker_settings, explore, resume_rounds

    bounds = [("--receivers", args.receivers, 1), ("--lengths", min(args.lengths), 1), ("--pool-blocks", args.pool_blocks, 1),
              ("--drops", args.drops, 0), ("--duplicates", args.duplicates, 0), ("--aborts", args.aborts, 0),
              ("--crashes", args.crashes, 0), ("--depth", args.depth, 0), ("--max-states", args.max_states, 1),
              ("--max-delay", args.max_delay, 0)]
    for flag, value, least in bounds:
        if value < least:
            print(f"embxfer check: {flag} must be at least {least}, got {value}", file=sys.stderr)
            return 2
    settings = checker_settings(args.pool_blocks, quarantine_timeout=args.quarantine_timeout)
    config = Config(receivers=args.receivers, lengths=tuple(args.lengths), drops=args.drops, duplicates=args.duplicates,
                    aborts=args.aborts, crashes=args.crashes, max_depth=args.depth, settings=settings,
                    max_delay=args.max_delay)
    rounds = ", ".join(f"{n} ({resume_rounds(n, settings)} resume{'s' if resume_rounds(n, settings) != 1 else ''})"
                       for n in config.lengths)
    print(f"embxfer check — {args.receivers} receiver(s), rooms of {rounds} tokens, pool {args.pool_blocks} x "
          f"{settings.block_size}-token blocks; faults: {args.drops} drop, {args.duplicates} duplicate, {args.aborts} abort, "
          f"{args.crashes} crash; any delivery order within {args.max_delay:g} s; timeouts (quarantine "
          f"{settings.quarantine_timeout:g} s); depth <= {args.depth}")

    def progress(states: int, depth: int, seconds: float) -> None:
        print(f"  ... {states} states, depth {depth}, {seconds:.0f} s", file=sys.stderr, flush=True)

    try:
        result = explore(config, max_states=args.max_states, progress=progress)
    except RuntimeError as error:
        print(f"embxfer check: {error}", file=sys.stderr)
        return 2
    print(f"  states explored {result.states}, deepest {result.depth} events, {result.seconds:.1f} s "
          f"({result.rate:,.0f} states/s), {result.quiescent} quiescent states checked"
          + (f", {result.truncated} states cut at the depth bound" if result.truncated else ""))
    if result.violation:
        print("  VIOLATION:")
        for problem in result.violation:
            print(f"    {problem}")
        print(f"  shortest trace ({len(result.trace or ())} events):")
        for step, words in enumerate(result.described or (), 1):
            print(f"    {step:>2}. {words}")
        return 1
    print("  no violation: every invariant held in every state; no deadlock; every room ended"
          + ("" if not result.truncated else " (within the depth bound)"))
    return 0


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
    if args.fork:
        return _fork_demo(args)
    settings = Settings.from_env(
        pool_blocks=args.pool_blocks, hidden_size=args.hidden_size, dtype=args.dtype,
        **({"data_plane": args.transport} if args.transport != "loopback" else {}),
    )
    summary = None
    if args.transport != "loopback":
        summary = run_two_process_demo(settings, args.rooms, args.in_flight, args.receivers, args.seed, args.verbose)
    if summary is None:
        summary = run_loopback_workload(settings, args.rooms, args.in_flight, args.receivers, args.seed)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)
    ok = not (summary["failed"] or summary["wrong_rows"] or summary["leaked_blocks"] or summary["protocol_violations"])
    return 0 if ok else 1


def _fork_demo(args: argparse.Namespace) -> int:
    from embxfer.adapters.sglang.deployment import environment, run_fork_demo

    plane = {} if args.transport == "loopback" else {"EMBXFER_DATA_PLANE": args.transport}
    with environment(**plane):
        summary = run_fork_demo("loopback" if args.transport == "loopback" else "wires", args.rooms, args.seed)
    summary["transport"] = args.transport
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(f"embxfer demo --fork — the SGLang fork's queue loops, transport {args.transport}, "
              f"2 encode servers into 1 language pool")
        print(f"  requests     {summary['requests']}: {summary['exact']} prefilled with exactly their rows")
        print(f"  tokens       {summary['tokens']} in {summary['seconds']:.3f} s")
        print(f"  left over    {summary['leftovers'] or 'nothing (every block back, every record forgotten)'}")
        print(f"  result       {'OK' if summary['ok'] else 'FAILED'}")
    return 0 if summary["ok"] else 1


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
            deadline = link.next_room_deadline()  # nothing in flight: only time can move things
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
