"""The asyncio face: rooms awaited from an event loop, no polling, no thread per request."""

from __future__ import annotations

import asyncio
import threading

import pytest

from embxfer.adapters import connect_local
from embxfer.adapters.aio import AsyncRooms
from embxfer.adapters.workload import room_data
from embxfer.core import Poll, Settings

S = Settings(block_size=16, default_blocks=2, pool_blocks=8, hidden_size=32, dtype="float16", data_plane="zmq")


def test_await_each_room_and_iterate_the_finished_ones() -> None:
    async def main() -> None:
        with connect_local(S) as link:
            rx, server = link.receivers[0], link.sender
            rooms = AsyncRooms(rx)
            threads_before = threading.active_count()
            data = {room: room_data(5, room, S, num_tokens=10 + 30 * room) for room in range(1, 9)}
            for room in data:
                rx.init(room)
            waits = [asyncio.create_task(rooms.wait(room, timeout=30)) for room in data]
            for room, rows in data.items():
                server.send(room, rows)
            assert await asyncio.gather(*waits) == [Poll.Success] * len(data)
            assert threading.active_count() == threads_before  # no thread per request
            for room, rows in data.items():
                assert rx.take(room).same_bytes(rows)
            # the iterator saw every one of them end, in the order they ended
            seen = []
            async for finished in rooms:
                seen.append(finished.room)
                if len(seen) == len(data):
                    break
            assert sorted(seen) == sorted(data)
            # a room that fails is awaited the same way
            rx.init(50)
            waiting = asyncio.create_task(rooms.wait(50, timeout=30))
            await asyncio.sleep(0)
            server.abort(50, reason="no longer needed")
            assert await waiting == Poll.Failed
            assert "no longer needed" in rx.failure(50)

    asyncio.run(main())


def test_wait_times_out_and_a_finished_room_answers_at_once() -> None:
    async def main() -> None:
        with connect_local(S) as link:
            rx, server = link.receivers[0], link.sender
            rooms = AsyncRooms(rx)
            rx.init(3)
            with pytest.raises(TimeoutError):
                await rooms.wait(3, timeout=0.05)
            server.send(3, room_data(5, 3, S, num_tokens=12))
            assert await rooms.wait(3, timeout=30) == Poll.Success
            assert await rooms.wait(3, timeout=0) == Poll.Success  # already finished
            assert rooms._waiters == {}

    asyncio.run(main())
