"""Shared test helpers: small settings, synthetic rows, a two-party harness over loopback."""

from __future__ import annotations

from embxfer.adapters import connect_loopback
from embxfer.adapters.workload import room_data
from embxfer.core import Settings

SMALL = Settings(block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32")


def rows(num_tokens: int, settings: Settings = SMALL, room: int = 0, seed: int = 3):  # type: ignore[no-untyped-def]
    return room_data(seed, room, settings, num_tokens=num_tokens)


def transfer(settings: Settings, lengths: dict[int, int], receivers: int = 1):  # type: ignore[no-untyped-def]
    """Init every room on every receiver, send, run to idle; returns (link, sent data)."""
    link = connect_loopback(settings, receivers=receivers)
    sent = {}
    for room, n in lengths.items():
        for rx in link.receivers:
            rx.init(room)
        sent[room] = rows(n, settings, room)
        link.sender.send(room, sent[room])
    link.run_until_idle()
    return link, sent


def resume_rounds(receiver, room_count: int | None = None) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """Histogram {resume rounds: rooms} from a receiver's counters."""
    return {
        int(key.split(":")[1]): count
        for key, count in receiver.endpoint.stats.items()
        if key.startswith("resume_rounds:")
    }


def all_free(link) -> bool:  # type: ignore[no-untyped-def]
    """Every receiver pool whole again and no sender source still held (any kind of link)."""
    free = link.free_blocks()
    return free["receivers"] == [link.settings.pool_blocks] * len(link.receivers) and free["sender_sources_held"] == 0


def control(link, kind: str, dst: str | None = None) -> list[int]:  # type: ignore[no-untyped-def]
    """Indices of pending loopback control messages of one kind (by decoding the frames)."""
    from embxfer.core import decode

    return [
        i for i, p in enumerate(link.network.pending)
        if not p.is_data and type(decode(p.frames)).__name__ == kind and (dst is None or p.dst == dst)
    ]


def wait_until(runtime, condition, timeout: float, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Wait on a real runtime's condition variable: its I/O thread signals after every wake-up
    (messages, completions, heartbeats), so the condition is re-checked as things change."""
    with runtime.changed:
        assert runtime.changed.wait_for(condition, timeout), f"{what}: not within {timeout} s"
