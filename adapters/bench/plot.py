"""``embxfer bench --plot FILE``: one PNG of the run (matplotlib: ``pip install 'embxfer[plot]'``).

Four panels: data-plane throughput per size and transport (log scale), embxfer ÷ raw
Mooncake per size and resume count, control-plane rooms/s per rooms in flight against
bare ZeroMQ, and every target as its headroom (≥ 1 is met).
"""

from __future__ import annotations

from typing import Any

DATA_PLANE_SERIES = (  # figure, legend, colour
    ("embxfer_mooncake", "embxfer (zmq + Mooncake)", "tab:blue"),
    ("embxfer_zmq", "embxfer (zmq data plane)", "tab:cyan"),
    ("raw_mooncake", "raw transfer_sync_write", "tab:orange"),
    ("pickle_zmq", "pickle over zmq REQ/REP", "tab:red"),
    ("memcpy", "memcpy (ceiling)", "tab:gray"),
)


class PlotUnavailable(RuntimeError):
    pass


def write_png(result: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'embxfer[plot]'") from None
    figure, axes = plt.subplots(2, 2, figsize=(16, 12))
    cases = result["cases"]
    _data_plane_bars(axes[0][0], cases.get("data-plane"))
    _data_plane_ratios(axes[0][1], cases.get("data-plane"))
    _control_plane(axes[1][0], cases.get("control-plane"))
    _targets(axes[1][1], result["targets"])
    figure.suptitle(f"embxfer bench — {result['machine']['cpus']} CPUs, {result['started']}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _not_run(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _usable(case: Any) -> bool:
    return bool(case) and not case.get("error") and bool(case.get("rows"))


def _data_plane_bars(ax: Any, case: Any) -> None:
    title = "Data plane throughput (no resume; median)"
    if not _usable(case):
        return _not_run(ax, title)
    fewest = min(row["params"]["resumes_asked"] for row in case["rows"])
    rows = [row for row in case["rows"] if row["params"]["resumes_asked"] == fewest]
    width = 0.8 / len(DATA_PLANE_SERIES)
    for index, (name, label, colour) in enumerate(DATA_PLANE_SERIES):
        xs = [position + (index - len(DATA_PLANE_SERIES) / 2 + 0.5) * width for position in range(len(rows))]
        values = [row["figures"].get(name) or 0 for row in rows]
        ax.bar(xs, values, width, label=label, color=colour)
    ax.set_xticks(range(len(rows)), [f"{row['params']['megabytes']} MB" for row in rows])
    ax.set_yscale("log")
    ax.set_ylabel("MB/s")
    ax.set_title(title if fewest == 0 else f"Data plane throughput ({fewest} resume(s))")
    ax.legend(fontsize=8)


def _data_plane_ratios(ax: Any, case: Any) -> None:
    title = "embxfer ÷ raw transfer_sync_write (same bytes, same run)"
    if not _usable(case):
        return _not_run(ax, title)
    by_resumes: dict[int, list[tuple[int, float]]] = {}
    zmq_points: list[tuple[int, float]] = []
    for row in case["rows"]:
        size, asked = row["params"]["megabytes"], row["params"]["resumes_asked"]
        ratio = row["ratios"]["embxfer_mooncake/raw_mooncake"]["value"]
        if ratio is not None:
            by_resumes.setdefault(asked, []).append((size, ratio))
        zmq_ratio = row["ratios"].get("embxfer_zmq/raw_mooncake", {}).get("value")
        if zmq_ratio is not None and asked == 0:
            zmq_points.append((size, zmq_ratio))
    for asked, points in sorted(by_resumes.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"Mooncake, {asked} resume(s)")
    if zmq_points:
        ax.plot([p[0] for p in zmq_points], [p[1] for p in zmq_points], marker="s", linestyle="--", label="zmq data plane, 0 resumes")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    sizes = sorted({row["params"]["megabytes"] for row in case["rows"]})
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.set_xlabel("MB of embedding rows")
    ax.set_ylabel("ratio")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _control_plane(ax: Any, case: Any) -> None:
    title = "Control plane: small rooms/s across two processes"
    if not _usable(case):
        return _not_run(ax, title)
    rows = case["rows"]
    levels = [row["params"]["in_flight"] for row in rows]
    ax.plot(levels, [row["figures"]["rooms_per_s"] or 0 for row in rows], marker="o", label="embxfer rooms/s")
    ax.plot(levels, [row["figures"]["zmq_round_trips_per_s"] or 0 for row in rows], marker="s",
            linestyle="--", label="bare zmq round trips/s")
    ax.axhline(2000, color="green", linewidth=0.8, linestyle=":", label="target 2,000 rooms/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(level) for level in levels])
    ax.set_yscale("log")
    ax.set_xlabel("rooms in flight")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _targets(ax: Any, targets: list[dict[str, Any]]) -> None:
    title = "Targets: headroom (≥ 1 is met)"
    measured = [t for t in targets if t["value"] is not None]
    if not measured:
        return _not_run(ax, title)
    labels, headroom, colours = [], [], []
    for target in measured:
        value, threshold = target["value"], target["threshold"]
        if target["comparison"] == ">=":
            room = value / threshold if threshold else float("inf")
        else:
            room = threshold / value if value else float("inf")
        labels.append(f"{target['row']}: {target['description']}")
        headroom.append(min(room, 100.0))
        colours.append("tab:green" if target["met"] else "tab:red")
    positions = range(len(labels))
    ax.barh(positions, headroom, color=colours)
    ax.set_yticks(positions, labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_title(title)
