"""The two serving processes: ``serve-encode`` (sender) and ``serve-language`` (receiver)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

from embxfer.core import LocalProtocolError, Poll
from embxfer.transports.auth import AuthKeys
from embxfer.transports.buffers import EmbeddingData
from embxfer.transports.mooncake import MooncakeUnavailable
from embxfer.transports.nixl import NixlUnavailable

from ._auth_flags import AuthChoiceError, auth_from
from ._encode import EncodeServer
from ._language import LanguageClient
from ._native_stderr import hide_native_log_lines
from .settings_flags import add_settings_flags, settings_from  # noqa: F401  (add_settings_flags: re-exported)
from .workload import room_data


def _rss_mb() -> float:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _counters(stats: dict[str, Any]) -> dict[str, Any]:
    """The plain counters and gauges of ``stats()`` (histograms left to the metrics port)."""
    return {k: v for k, v in stats.items() if k != "histograms"}


def _start_metrics(args: argparse.Namespace, role: str, stats: Any) -> Any:
    if getattr(args, "metrics_port", None) is None:
        return None
    from .metrics import serve_metrics

    server = serve_metrics(args.metrics_port, {role: stats}, addr=args.metrics_addr)
    print(f"embxfer: metrics on http://{args.metrics_addr}:{server.server_address[1]}/metrics", file=sys.stderr, flush=True)
    return server


def _stop_metrics(server: Any) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:  # the bar is optional (embxfer[progress])
        return None
    return tqdm(total=total, desc=desc, unit="room", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


class _Stop:
    """Ctrl-C / SIGTERM set an event the main thread waits on; the I/O thread is untouched.
    A second one while the shutdown runs exits at once (nothing is cleaned up then)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_: Any) -> None:
        if self.event.is_set():
            os.write(sys.stderr.fileno(), b"embxfer: interrupted again, exiting now without cleaning up\n")
            os._exit(130)
        self.event.set()


def _show_logs(verbose: bool) -> None:
    """A server shows, on stderr, each failed room (rate-limited) and each refused peer;
    with --verbose, every room and Mooncake's own lines as well."""
    if not verbose:
        hide_native_log_lines()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("embxfer %(message)s"))
    logger = logging.getLogger("embxfer")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _prepare(args: argparse.Namespace, role: str) -> tuple[Any, AuthKeys | None] | None:
    """Settings, logs and keys of a serve command; None (having said why) when it cannot start."""
    settings = settings_from(args)
    _show_logs(args.verbose)
    try:
        return settings, auth_from(args, role)
    except AuthChoiceError as error:
        print(f"embxfer serve-{role}: {error}", file=sys.stderr)
        return None


def serve_encode(args: argparse.Namespace) -> int:
    prepared = _prepare(args, "encode")
    if prepared is None:
        return 2
    settings, auth = prepared
    stop = _Stop()
    seed, skip = args.synthetic_seed, args.skip_every

    def synthetic(room: int) -> EmbeddingData | None:
        if skip and room % skip == skip - 1:
            return None  # never sent: its receiver times out
        return room_data(seed, room, settings)

    data_for_room = None if seed is None else synthetic
    try:
        server = EncodeServer(settings, host=args.host, bootstrap_port=args.bootstrap_port, protocol=args.protocol,
                              device=args.rdma_device, data_for_room=data_for_room, verbose=args.verbose,
                              forget_finished=True, close_grace=args.shutdown_grace, cancelled=stop.event.is_set,
                              auth=auth)
    except (MooncakeUnavailable, NixlUnavailable) as error:
        if stop.event.is_set():
            print("embxfer serve-encode: interrupted while starting", file=sys.stderr, flush=True)
            return 130
        print(f"embxfer: {error}", file=sys.stderr)
        return 3
    plane = settings.data_plane + (f"/{args.protocol}, session {server.session_id}"
                                   if settings.data_plane in ("mooncake", "auto") else "")
    secured = (f"CURVE, {len(auth.admitted())} language key(s) admitted" if auth is not None else
               "insecure: anyone who reaches the port can register, send and abort")
    print(f"embxfer serve-encode: ready on {server.bootstrap_addr} (data plane {plane}; {secured})", flush=True)
    metrics = _start_metrics(args, "encode", server.stats)
    bar = _progress(None, "encode rooms", not args.no_progress)
    shown = 0
    started = time.monotonic()
    next_status = started + args.status_every if args.status_every > 0 else None
    while not stop.event.is_set():
        stop.event.wait(0.2)  # the UI thread's refresh tick; the protocol never waits on it
        stats = server.stats()
        done = stats.get("rooms_finished", 0)
        if next_status is not None and time.monotonic() >= next_status:
            next_status += args.status_every
            print(json.dumps(_status(server, stats)), flush=True)
        if bar is not None and done > shown:
            bar.update(done - shown)
            shown = done
    in_flight = server.rooms_in_flight()
    writing = server.stats().get("data_writes_in_engine", 0)
    if in_flight or writing:  # (an idle server just stops)
        print(f"embxfer serve-encode: shutting down ({in_flight} rooms in flight, {writing} writes in the data plane, "
              f"given up to {args.shutdown_grace:g} s; Ctrl-C again exits at once)", file=sys.stderr, flush=True)
    closing = time.monotonic()
    server.close(reason="shutdown")
    _stop_metrics(metrics)
    stats = server.stats()
    if bar is not None:
        bar.close()
    summary = {
        "role": "encode", "seconds": round(time.monotonic() - started, 3),
        "succeeded": stats.get("rooms_succeeded", 0), "failed": stats.get("rooms_failed", 0),
        "failed_at_shutdown": in_flight, "rows_written": stats.get("bytes_rows_written", 0),
        "sources_held": server.sources_held(), "abandoned_writes": server.abandoned_writes,
        "shutdown_seconds": round(time.monotonic() - closing, 3),
        "dropped": {k: v for k, v in stats.items() if k.endswith("_dropped")},
        "counters": _counters(stats),
    }
    print(json.dumps(summary) if args.json else
          f"embxfer serve-encode: {summary['succeeded']} rooms succeeded, {summary['failed']} failed "
          f"({in_flight} in flight at shutdown), {summary['rows_written']} rows written, "
          f"{summary['sources_held']} sources held"
          + (f"; abandoned {server.abandoned_writes} writes stuck in the data plane" if server.abandoned_writes else ""),
          flush=True)
    return 0  # (the CLI exits without waiting for writes abandoned inside the data plane)


def _status(server: EncodeServer, stats: dict[str, Any]) -> dict[str, Any]:
    """One line of ``serve-encode --status-every``: what an operator asks a running server."""
    return {
        "status": "encode", "rooms_in_flight": server.rooms_in_flight(), "sources_held": server.sources_held(),
        "succeeded": stats.get("rooms_succeeded", 0), "failed": stats.get("rooms_failed", 0),
        "peers_alive": stats.get("peers_alive", 0),
        "writes_in_data_plane": stats.get("data_writes_in_engine", 0), "rss_mb": round(_rss_mb(), 1),
    }


def _interrupted_while_connecting() -> None:
    print("embxfer serve-language: interrupted while connecting", file=sys.stderr, flush=True)
    # nothing started, the client is closed: leave now (Mooncake's engine takes about a
    # second to tear down at interpreter exit, and Ctrl-C must not wait for it)
    sys.stdout.flush()
    os._exit(130)


def serve_language(args: argparse.Namespace) -> int:
    prepared = _prepare(args, "language")
    if prepared is None:
        return 2
    settings, auth = prepared
    stop = _Stop()
    if not args.json:  # (with --json, stdout and stderr carry only the summary and errors)
        print(f"embxfer serve-language: registering with {args.bootstrap_addr} (rank {args.rank}"
              f"{'' if auth is not None else '; insecure: no authentication'})", file=sys.stderr, flush=True)
    try:
        client = LanguageClient(settings, args.bootstrap_addr, rank=args.rank,
                                required_dst_info_num=args.required_dst_info_num, protocol=args.protocol,
                                device=args.rdma_device, host=args.host, verbose=args.verbose, wait_for_peer=False,
                                cancelled=stop.event.is_set, auth=auth)
        if not client.wait_connected(settings.bootstrap_timeout, cancelled=stop.event.is_set):
            _interrupted_while_connecting()
    except (MooncakeUnavailable, NixlUnavailable) as error:
        if stop.event.is_set():
            _interrupted_while_connecting()
        print(f"embxfer: {error}", file=sys.stderr)
        return 3
    except ConnectionError as error:
        print(f"embxfer serve-language: {error}", file=sys.stderr)
        return 2
    bar = _progress(args.requests, f"language rank {args.rank}", not args.no_progress)
    metrics = _start_metrics(args, f"language{args.rank}", client.stats)
    rooms = list(range(args.first_room, args.first_room + args.requests))
    pending = list(rooms)
    active: list[int] = []
    succeeded = failed = wrong = 0
    reasons: Counter[str] = Counter()
    rounds: Counter[int] = Counter()
    byte_count = 0
    started = time.monotonic()
    while (pending or active) and not stop.event.is_set():
        while pending and len(active) < args.in_flight:
            room = pending.pop(0)
            client.init(room)
            if args.abort_every and room % args.abort_every == args.abort_every - 1:
                client.abort(room)
            active.append(room)
        # whichever rooms end first (no head-of-line wait); Ctrl-C is seen within the timeout
        for room in client.wait_any(active, timeout=0.5):
            active.remove(room)
            try:
                state = client.poll(room)
            except LocalProtocolError:  # forgotten unread (retention_timeout passed)
                failed += 1
                reasons["forgotten unread"] += 1
                continue
            if state == Poll.Success:
                data = client.take(room)
                if args.verify and not data.same_bytes(room_data(args.synthetic_seed, room, settings)):
                    wrong += 1
                byte_count += data.embeddings.numel() * data.embeddings.element_size() + data.num_tokens * 32
                succeeded += 1
            else:
                failed += 1
                reasons[client.failure(room)] += 1
                client.forget(room)
            if bar is not None:
                bar.update(1)
            if args.report_every and (succeeded + failed) % args.report_every == 0:
                print(json.dumps({"progress": succeeded + failed, "bytes": byte_count, "rss_mb": round(_rss_mb(), 1)}),
                      flush=True)
    interrupted = stop.event.is_set()
    for key, count in client.stats().items():
        if key.startswith("resume_rounds:"):
            rounds[int(key.split(":")[1])] += count
    quarantined = client.stats()["quarantined_blocks"]
    counters = _counters(client.stats())
    aborted = client.close(reason="shutdown")
    _stop_metrics(metrics)
    if bar is not None:
        bar.close()
    elapsed = time.monotonic() - started
    # honest counts: rooms never started are not failures, and rooms still in flight when
    # the run was interrupted were aborted by the shutdown, not by the protocol
    not_started = len(pending)
    summary = {
        "role": "language", "rank": args.rank, "requests": args.requests,
        "started": args.requests - not_started, "succeeded": succeeded, "failed": failed,
        "in_flight_at_interrupt": len(active) if interrupted else 0, "not_started": not_started, "wrong_rows": wrong,
        "verified": bool(args.verify), "failure_reasons": dict(reasons),
        "resume_rounds_histogram": {str(k): rounds[k] for k in sorted(rounds)},
        "bytes": byte_count, "seconds": round(elapsed, 3),
        "mb_per_s": round(byte_count / elapsed / 1e6, 1) if elapsed > 0 else 0.0,
        "leaked_blocks": settings.pool_blocks - client.free_blocks(), "interrupted": interrupted,
        "aborted_at_shutdown": aborted, "quarantined_at_exit": quarantined, "counters": counters,
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        head = (f"interrupted: {summary['started']} of {args.requests} rooms started, {succeeded} succeeded, "
                f"{failed} failed, {summary['in_flight_at_interrupt']} in flight (aborted at shutdown), "
                f"{not_started} not started" if interrupted else
                f"{succeeded}/{args.requests} rooms succeeded, {failed} failed")
        print(f"embxfer serve-language rank {args.rank}: {head}, "
              f"{wrong} with wrong rows{' (verified)' if args.verify else ''}; {byte_count / 1e6:.1f} MB in {elapsed:.2f} s; "
              f"resume rounds {summary['resume_rounds_histogram']}; leaked blocks {summary['leaked_blocks']}", flush=True)
        if reasons:
            print(f"  failures: {dict(reasons)}", flush=True)
    ok = succeeded == args.requests and wrong == 0 and summary["leaked_blocks"] == 0
    return 0 if ok else 1
