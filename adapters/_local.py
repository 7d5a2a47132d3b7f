"""A real link in one process: an encode server and N language clients over ZeroMQ TCP
on 127.0.0.1, rows over Mooncake or zmq frames (``settings.data_plane``) — the same facade
as ``connect_loopback``, on real wires."""

from __future__ import annotations

from typing import Any

import attrs

from embxfer.core import LocalProtocolError, Poll, Settings

from ._encode import EncodeServer
from ._language import LanguageClient


class LocalLink:
    def __init__(self, settings: Settings, receivers: int = 1, *, protocol: str = "tcp", device: str = "",
                 host: str = "127.0.0.1", verbose: bool = False, data_plane: str | None = None) -> None:
        if receivers < 1:
            raise LocalProtocolError("receivers must be at least 1", field="receivers")
        if data_plane is not None:
            settings = attrs.evolve(settings, data_plane=data_plane)
        self.settings = settings
        self.sender = EncodeServer(settings, host=host, protocol=protocol, device=device, verbose=verbose)
        self.receivers: list[LanguageClient] = []
        try:
            for rank in range(receivers):
                self.receivers.append(LanguageClient(
                    settings, self.sender.bootstrap_addr, rank=rank, required_dst_info_num=receivers,
                    protocol=protocol, device=device, host=host, verbose=verbose,
                ))
        except BaseException:
            self.close()
            raise

    def wait(self, rooms: Any, timeout: float = 60.0) -> dict[int, list[Poll]]:
        """Block until every room is terminal on every receiver; returns their Polls."""
        return {room: [rx.wait(room, timeout) for rx in self.receivers] for room in rooms}

    def free_blocks(self) -> dict[str, Any]:
        return {
            "receivers": [rx.free_blocks() for rx in self.receivers],
            "pool_blocks": self.settings.pool_blocks,
            "sender_sources_held": self.sender.sources_held(),
        }

    def close(self) -> None:
        for rx in self.receivers:
            rx.close()
        self.sender.close()

    def __enter__(self) -> "LocalLink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect_local(settings: Settings | None = None, receivers: int = 1, **options: Any) -> LocalLink:
    """An encode server and ``receivers`` language clients on real transports, in-process.

    ``data_plane="zmq"`` (or ``Settings(data_plane="zmq")``) carries rows as zmq frames and
    needs no Mooncake."""
    return LocalLink(settings or Settings(), receivers, **options)
