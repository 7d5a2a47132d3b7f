"""An ``asyncio`` face for engines built on an event loop (SGLang's tokenizer manager,
vLLM's engine core): ``await rooms.wait(room)`` and ``async for finished in rooms``, with
no busy polling and no thread per request.

The runtime's one I/O thread tells this object each time a room ends; the news crosses into
the event loop with ``call_soon_threadsafe``, where waiters are woken.  Everything else
(``init``, ``send``, ``take``, ``abort``) stays on the runtime: those calls never block.

    rooms = AsyncRooms(client)          # a LanguageClient or an EncodeServer, in the loop
    client.init(room)
    poll = await rooms.wait(room)       # Success or Failed
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from embxfer.core import Poll, RoomFinished, check_room


class AsyncRooms:
    """Rooms of one runtime, awaited from one event loop (build it inside that loop)."""

    def __init__(self, runtime: Any, *, max_buffered: int = 65_536) -> None:
        self.runtime = runtime
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[int, list[asyncio.Future[Poll]]] = {}
        self._finished: asyncio.Queue[RoomFinished] = asyncio.Queue(max_buffered)
        self.dropped = 0  # finished rooms nobody iterated while the buffer was full
        runtime.add_finished_listener(self._from_io_thread)

    async def wait(self, room: int, timeout: float | None = None) -> Poll:
        """The room's outcome once it has one (Success or Failed); ``TimeoutError`` after
        ``timeout`` seconds.  A room this runtime no longer knows raises the runtime's error."""
        check_room(room)
        future: asyncio.Future[Poll] = self._loop.create_future()
        self._waiters.setdefault(room, []).append(future)
        try:
            poll = self.runtime.poll(room)  # after registering: an end in between is not missed
            if poll in (Poll.Success, Poll.Failed):
                return Poll(poll)
            return await asyncio.wait_for(future, timeout)
        finally:
            waiters = self._waiters.get(room)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[room]

    async def __aiter__(self) -> AsyncIterator[RoomFinished]:
        """Every room that ends from now on, in the order the runtime ended them."""
        while True:
            yield await self._finished.get()

    # -- inside ------------------------------------------------------------------------
    def _from_io_thread(self, finished: RoomFinished) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, finished)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _deliver(self, finished: RoomFinished) -> None:
        for future in self._waiters.pop(finished.room, []):
            if not future.done():
                future.set_result(Poll(finished.poll))
        try:
            self._finished.put_nowait(finished)
        except asyncio.QueueFull:
            self.dropped += 1
