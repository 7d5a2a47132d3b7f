"""A self-pipe wake-up for loops that sleep in ``zmq.Poller.poll``."""

from __future__ import annotations

import os


class Wakeup:
    """A self-pipe: another thread wakes a ``zmq.Poller`` loop without busy polling.

    Register ``read_fd`` with the poller for ``zmq.POLLIN``; ``wake`` from any thread,
    ``drain`` on the loop's thread after it wakes, ``close`` once the loop has stopped.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except OSError:
            pass  # already pending, or closed while shutting down

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
