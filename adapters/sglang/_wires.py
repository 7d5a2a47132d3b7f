"""The fork's transfer manager on real wires: ZeroMQ control, rows over Mooncake or the zmq
data plane (``EMBXFER_DATA_PLANE``).

Encode side: one ``EncodeServer`` bound to ``server_args.host:disaggregation_bootstrap_port``
(+ the rank, for tensor-parallel encode servers).  Language side: one pool and one data-plane
engine for the process; the first request naming an encode server's ``bootstrap_addr``
connects to it (one ``LanguageClient`` per encode server, all on that pool and lock).
"""

from __future__ import annotations

import time
from typing import Any

from embxfer.transports.mooncake import MooncakeEngine, register_pool
from embxfer.transports.nixl import NixlEngine

from .._encode import EncodeServer
from .._language import LanguageClient
from .._rows import RowSink
from ._manager import ENCODE, ManagerBase


class EmbeddingManager(ManagerBase):
    """``EmbeddingManager(kv_args, disaggregation_mode, server_args)``, as the fork builds its
    ``MooncakeEmbeddingManager``.  ``server_args.host`` is the address this process binds;
    ``embxfer_encode_tp_size`` (default 1) is how many encode ranks share an address."""

    def __init__(self, args: Any, disaggregation_mode: Any, server_args: Any) -> None:
        super().__init__(args, disaggregation_mode, server_args)
        self.host = str(getattr(server_args, "host", None) or "127.0.0.1")
        self.encode_tp_size = int(getattr(server_args, "embxfer_encode_tp_size", 1) or 1)
        self.engine: MooncakeEngine | NixlEngine | None = None
        self.server: EncodeServer | None = None
        if self.mode == ENCODE:
            self.server = EncodeServer(self.settings, host=self.host,
                                       bootstrap_port=int(self.bootstrap_port) + self.engine_rank, lock=self.lock)
        else:
            self.rows = RowSink(self.settings, self.buffers.pool)
            if self.settings.data_plane in ("mooncake", "auto"):
                self.engine = MooncakeEngine(self.host)
                register_pool(self.engine, self.buffers.pool)
            elif self.settings.data_plane == "nixl":
                self.engine = NixlEngine("language")  # one agent for the pool every client shares

    def now(self) -> float:
        return time.monotonic()

    def _sender(self) -> EncodeServer:
        assert self.server is not None
        return self.server

    def _connect(self, bootstrap_addr: str) -> LanguageClient:
        host, _, port = bootstrap_addr.rpartition(":")
        encode_rank, rank, required = self.destination(self.encode_tp_size)
        return LanguageClient(
            self.settings, f"{host}:{int(port) + encode_rank}", rank=rank, required_dst_info_num=required,
            host=self.host, engine=self.engine, rows=self.rows, allocator=self.allocator.core, lock=self.lock,
            wait_for_peer=False,  # the scheduler's thread never waits: its polls say Bootstrapping meanwhile
        )

    def close(self) -> None:
        """Stop this manager's sockets and threads (rooms in flight fail with "shutdown")."""
        for link in list(self._links.values()):
            link.close()
        self._links.clear()
        if self.server is not None:
            self.server.close()
        if isinstance(self.engine, NixlEngine):
            self.engine.close()  # the shared pool's registration, while its memory is still ours
