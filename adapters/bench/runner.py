"""``embxfer bench``: the plans, the case table, the run loop, the progress bar and the
``bench`` subcommand's flags (the package docstring lists the cases)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

from .report import CaseResult, target_json, targets_table

CASES = ("data-plane", "loopback", "core", "control-plane", "scale", "allocator", "prealloc")


@attrs.frozen
class Plan:
    """How big each case runs: ``full`` (the default, a few minutes) or ``quick`` (< 60 s)."""

    sizes: list[int]
    resumes: list[int]
    repeat: int
    loopback_sizes: list[int]
    core_rooms: int
    control_levels: list[int]
    control_rooms: dict[int, int]
    scale_rooms: list[int]
    scale_cycles: int
    allocator_pairs: int
    prealloc_rooms: int
    prealloc_in_flight: int = 8


FULL = Plan(sizes=[1, 4, 16, 64], resumes=[0, 1, 3], repeat=5, loopback_sizes=[16, 64], core_rooms=5000,
            control_levels=[1, 64, 1024], control_rooms={1: 500, 64: 2000, 1024: 4096}, scale_rooms=[10_000],
            scale_cycles=10_000, allocator_pairs=50_000, prealloc_rooms=2000)
QUICK = Plan(sizes=[1, 4], resumes=[0, 1], repeat=2, loopback_sizes=[16], core_rooms=1000,
             control_levels=[1, 64, 1024], control_rooms={1: 50, 64: 300, 1024: 1088}, scale_rooms=[10_000],
             scale_cycles=1000, allocator_pairs=10_000, prealloc_rooms=400)


def plan_from(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.sizes:
        changes["sizes"] = args.sizes
        in_range = [size for size in args.sizes if 16 <= size <= 64]
        changes["loopback_sizes"] = in_range or base.loopback_sizes
    if args.resumes:
        changes["resumes"] = args.resumes
    if args.repeat:
        changes["repeat"] = args.repeat
    return attrs.evolve(base, **changes)


Step = Callable[[str], None]


def _case_runner(name: str, plan: Plan) -> tuple[int, Callable[[Step], CaseResult]]:
    """The number of progress steps a case takes, and how to run it."""
    repeat = plan.repeat
    if name == "data-plane":
        from .data_plane import data_plane_steps, run_data_plane

        return data_plane_steps(plan.sizes, plan.resumes), lambda step: run_data_plane(plan.sizes, plan.resumes, repeat, step)
    if name == "loopback":
        from .data_plane import loopback_steps, run_loopback

        return loopback_steps(plan.loopback_sizes), lambda step: run_loopback(plan.loopback_sizes, repeat, step)
    if name == "core":
        from .core import core_steps, run_core_overhead

        return core_steps(), lambda step: run_core_overhead(plan.core_rooms, max(3, repeat), step)
    if name == "control-plane":
        from .control import control_steps, run_control_plane

        return (control_steps(plan.control_levels),
                lambda step: run_control_plane(plan.control_levels, lambda level: plan.control_rooms.get(level, 1000), step))
    if name == "scale":
        from .core import run_scale, scale_steps

        return scale_steps(plan.scale_rooms), lambda step: run_scale(plan.scale_rooms, plan.scale_cycles, max(3, repeat), step)
    if name == "allocator":
        from .allocator import allocator_steps, run_allocator

        return allocator_steps(), lambda step: run_allocator(plan.allocator_pairs, max(3, repeat), step)
    if name == "prealloc":
        from .prealloc import prealloc_steps, run_prealloc

        return prealloc_steps(), lambda step: run_prealloc(plan.prealloc_rooms, plan.prealloc_in_flight, step)
    raise ValueError(f"unknown bench case {name!r}")


class _Progress:
    """A tqdm bar over every step of every case, on stderr (none without tqdm or with
    --no-progress); tables print above it."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
            except ImportError:  # the bar is optional (embxfer[progress])
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc="bench", unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def catch_up(self, position: int) -> None:
        if self.bar is not None and self.bar.n < position:
            self.bar.update(position - self.bar.n)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(cases: list[str], plan: Plan, progress: _Progress | None = None) -> tuple[dict[str, Any], list[CaseResult]]:
    """Run ``cases``: the JSON document and the results (tables print as cases finish)."""
    runners = [(name, *_case_runner(name, plan)) for name in cases]
    progress = progress or _Progress(0, False)
    if progress.bar is not None:
        progress.bar.total = sum(steps for _, steps, _ in runners)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    started = time.perf_counter()
    results: list[CaseResult] = []
    position = 0
    for name, steps, runner in runners:
        case_started = time.perf_counter()
        try:
            case = runner(progress.step)
        except Exception as error:  # one broken case must not hide the others' figures
            case = CaseResult(name, name, {}, [], error=f"{type(error).__name__}: {error}")
        case.seconds = time.perf_counter() - case_started
        position += steps
        progress.catch_up(position)
        results.append(case)
        progress.print(case.table() + "\n")
    targets = [{"case": case.name, "row": row.label, **target_json(target)}
               for case in results for row, target in case.targets()]
    verified = [case.verified for case in results if case.verified is not None]
    return {
        "schema": "embxfer-bench/1",
        "started": started_at,
        "seconds": round(time.perf_counter() - started, 2),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "plan": attrs.asdict(plan),
        "verified": bool(verified) and all(verified),
        "errors": {case.name: case.error for case in results if case.error},
        "cases": {case.name: case.to_json() for case in results},
        "targets": targets,
        "targets_met": sum(1 for t in targets if t["met"] is True),
        "targets_missed": sum(1 for t in targets if t["met"] is False),
    }, results


def main(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    cases = args.cases or list(CASES)
    print(f"embxfer bench — {', '.join(cases)}; {'quick' if args.quick else 'full'} plan, median of {plan.repeat}, "
          f"{os.cpu_count()} CPUs (busy machines give noisy figures; ratios are against baselines of this same run)",
          flush=True)
    progress = _Progress(0, not args.no_progress)
    try:
        document, results = run(cases, plan, progress)
    finally:
        progress.close()
    print(targets_table(results))
    print(f"{document['targets_met']} target(s) met, {document['targets_missed']} missed; "
          f"bytes verified: {'yes' if document['verified'] else 'NO'}; {document['seconds']:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, ensure_ascii=False)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from .plot import PlotUnavailable, write_png

        try:
            write_png(document, args.plot)
        except PlotUnavailable as error:
            print(f"embxfer bench: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if document["errors"] or not document["verified"] else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench", help="measure throughput, overhead and scale against baselines of the same run",
        description="Run the benchmark cases on this machine over 127.0.0.1.  Every figure is printed next to "
                    "its baseline from the same run, as a ratio; targets are marked met or missed.  With no "
                    "flags every case runs (a few minutes); --quick runs them all small (under a minute).",
    )
    bench.add_argument("--cases", nargs="+", choices=CASES, metavar="CASE",
                       help=f"cases to run (default: all): {', '.join(CASES)}")
    bench.add_argument("--sizes", type=_positive, nargs="+", help="data plane: megabytes of embedding rows (default 1 4 16 64; "
                                                            "sizes in 16–64 also set the loopback case's)")
    bench.add_argument("--resumes", type=_non_negative, nargs="+", help="data plane: resume rounds to force (default 0 1 3)")
    bench.add_argument("--repeat", type=_positive, help="runs per figure, after one warm-up; the median is reported (default 5)")
    bench.add_argument("--quick", action="store_true", help="every case at small sizes (under a minute)")
    bench.add_argument("--json", default="", metavar="FILE", help="write every figure, baseline, ratio and target here")
    bench.add_argument("--plot", default="", metavar="FILE", help="write a PNG chart here (needs embxfer[plot])")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar (it needs embxfer[progress])")
