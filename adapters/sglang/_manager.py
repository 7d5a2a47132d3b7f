"""The fork's transfer manager: one per process and side, built by the scheduler's queues as
``Manager(kv_args, disaggregation_mode, server_args)``.

A language-side manager owns one pool (the ``MultimodalDataBuffers`` whose pointers are in
``kv_args``) and talks to any number of encode servers, connecting lazily to each
``bootstrap_addr`` a request names: one receiver endpoint per encode server, all sharing the
pool's allocator.  An encode-side manager owns one sender endpoint.

``EmbeddingManager`` (``_wires.py``) is the real one, over ZeroMQ and Mooncake or the zmq
data plane.  ``LoopbackEmbeddingManager`` runs both sides in one process over a ``ForkLoopback`` network
(deterministic, for tests and the demo): ``server_args.embxfer_loopback`` names it.
"""

from __future__ import annotations

import threading
from typing import Any

from embxfer.core import Allocation, LocalProtocolError, Settings
from embxfer.transports.loopback import LoopbackNetwork, Packet

from .._loopback import ReceiverHandle, SenderHandle
from .._rows import RowSink
from ._pool import MultimodalDataBuffers, ReqToMetadataBlockAllocator, buffers_for

ENCODE, LANGUAGE = "encode", "language"


def mode_name(disaggregation_mode: Any) -> str:
    """The fork's ``DisaggregationMode`` (an enum whose value is "encode"/"language"), or the string."""
    name = str(getattr(disaggregation_mode, "value", disaggregation_mode)).lower()
    if name not in (ENCODE, LANGUAGE):
        raise LocalProtocolError(f"disaggregation_mode must be encode or language, got {disaggregation_mode!r}",
                                 field="disaggregation_mode")
    return name


class ManagerBase:
    """What both transports share: the side, the pool, its settings, the fork's rank sizes,
    and the one lock that orders the pool's users (the scheduler and the I/O threads)."""

    # later rounds of a room the scheduler resumed once are continued by embxfer in the
    # same blocks (the fork resumes once); False: the scheduler resumes every round itself
    continue_rounds = True

    def __init__(self, args: Any, disaggregation_mode: Any, server_args: Any) -> None:
        self.mode = mode_name(disaggregation_mode)
        self.kv_args = args
        self.server_args = server_args
        self.buffers: MultimodalDataBuffers = buffers_for(args)
        self.allocator: ReqToMetadataBlockAllocator = self.buffers.allocator
        self.settings: Settings = self.buffers.settings
        self.engine_rank = int(getattr(args, "engine_rank", 0) or 0)
        self.tp_size = int(getattr(server_args, "tp_size", 1) or 1)
        self.dp_size = int(getattr(server_args, "dp_size", 1) or 1)
        self.bootstrap_port = getattr(server_args, "disaggregation_bootstrap_port", 8998)
        self._links: dict[str, Any] = {}
        self.lock = threading.RLock()
        self.allocator.lock = self.lock
        if self.mode == LANGUAGE:
            self.allocator.partial = True
            self.allocator.release = self._release

    # -- language side -----------------------------------------------------------------
    def language_link(self, bootstrap_addr: str) -> Any:
        """The receiver endpoint for the encode server at ``bootstrap_addr`` (connected on first use)."""
        if self.mode != LANGUAGE:
            raise LocalProtocolError("an EmbeddingReceiver needs a language-side manager", field="mgr")
        with self.lock:
            link = self._links.get(bootstrap_addr)
        if link is None:
            link = self._connect(bootstrap_addr)  # outside the lock: it may wait for the encode server
            with self.lock:
                link = self._links.setdefault(bootstrap_addr, link)
        return link

    def destination(self, encode_tp_size: int) -> tuple[int, int, int]:
        """``(encode rank, our rank among its destinations, required_dst_info_num)``, as the
        fork computes them from the two sides' tensor-parallel sizes."""
        local = max(1, self.tp_size // self.dp_size)
        if local <= encode_tp_size:
            return self.engine_rank % local, 0, 1
        required = local // encode_tp_size
        return self.engine_rank % encode_tp_size, (self.engine_rank // encode_tp_size) % required, required

    def _release(self, allocation: Allocation) -> None:
        """The engine freed blocks: at once, unless an endpoint still holds them."""
        for link in self._links.values():
            if link.endpoint.holds(allocation):
                link.release(allocation)
                return
        self.allocator.core.free(allocation)

    def _connect(self, bootstrap_addr: str) -> Any:
        raise NotImplementedError

    # -- encode side -------------------------------------------------------------------
    def sender_link(self) -> Any:
        if self.mode != ENCODE:
            raise LocalProtocolError("an EmbeddingSender needs an encode-side manager", field="mgr")
        return self._sender()

    def _sender(self) -> Any:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def rooms(self) -> int:
        """Room records held by this manager's endpoints (0 once every outcome was read)."""
        links = list(self._links.values()) + ([self._sender()] if self.mode == ENCODE else [])
        return sum(len(link.endpoint.rooms) for link in links)


class ForkLoopback:
    """Encode and language managers of one test (or demo) on one deterministic network."""

    def __init__(self, heartbeat_interval: float = Settings().heartbeat_interval) -> None:
        self.network = LoopbackNetwork(keepalive_step=heartbeat_interval / 2)
        self.nodes: dict[str, Any] = {}
        self.encoders: dict[str, list[str]] = {}  # bootstrap address -> encode rank nodes

    @property
    def now(self) -> float:
        return self.network.now

    def run_until_idle(self, max_steps: int = 10_000_000) -> int:
        return self.network.run_until_idle(max_steps)

    def advance(self, seconds: float) -> None:
        self.network.advance(seconds)

    def add_sender(self, address: str, rank: int, handle: SenderHandle) -> None:
        self.nodes[handle.name] = handle
        self.encoders.setdefault(address, []).append(handle.name)
        self.network.attach_writer(handle.name, self._land_or_fail)

    def _land_or_fail(self, packet: Packet, error: str | None) -> None:
        sender = self.nodes[packet.src]
        if error is None:
            error = sender.land(packet.write, self.nodes[packet.dst])
        sender._on_write_done(packet, error)

    def violations(self) -> list[str]:
        return [v for node in self.nodes.values() for v in node.violations]


class _Site:
    """What a loopback handle needs of its owner: the network and the settings."""

    def __init__(self, network: LoopbackNetwork, settings: Settings) -> None:
        self.network = network
        self.settings = settings


class LoopbackEmbeddingManager(ManagerBase):
    def __init__(self, args: Any, disaggregation_mode: Any, server_args: Any) -> None:
        super().__init__(args, disaggregation_mode, server_args)
        world = getattr(server_args, "embxfer_loopback", None)
        if not isinstance(world, ForkLoopback):
            raise LocalProtocolError("server_args.embxfer_loopback must be a ForkLoopback", field="server_args")
        self.world = world
        self.site = _Site(world.network, self.settings)
        self.address = f"{getattr(server_args, 'host', '127.0.0.1')}:{self.bootstrap_port}"
        self.name = f"{self.mode}@{self.address}#{self.engine_rank}:{id(self):x}"
        self.rows = RowSink(self.settings, self.buffers.pool)
        self._sender_handle: SenderHandle | None = None
        if self.mode == ENCODE:
            self._sender_handle = SenderHandle(self.site, name=self.name)
            world.add_sender(self.address, self.engine_rank, self._sender_handle)

    def now(self) -> float:
        return self.world.now

    def _sender(self) -> SenderHandle:
        assert self._sender_handle is not None
        return self._sender_handle

    def _connect(self, bootstrap_addr: str) -> ReceiverHandle:
        encoders = self.world.encoders.get(bootstrap_addr)
        if not encoders:
            raise ConnectionError(f"nothing listens at {bootstrap_addr}")
        encode_rank, rank, required = self.destination(len(encoders))
        handle = ReceiverHandle(self.site, rank, required, name=f"{self.name}->{bootstrap_addr}",
                                sender=encoders[encode_rank], rows=self.rows, allocator=self.allocator.core)
        self.world.nodes[handle.name] = handle
        handle.connect()
        return handle
