"""NIXL data plane: each round is one NIXL WRITE of its coalesced extents, with a notification.

Facts this module is built on (measured on these machines with ``nixl-cu12`` 1.5.1, UCX
backend, CPU memory; see the README):
* the receiver registers its pool once and sends its agent metadata in ``PoolLayout``
  (over our control plane: no etcd, no NIXL listener port).  Memory registered after the
  metadata went out is not visible to the peer (``NIXL_ERR_NOT_FOUND``), so nothing is
  registered on the receiver after that;
* a transfer has no deadline of its own (ai-dynamo/nixl #2047): a write polls its handle
  and gives up after ``stuck_after`` seconds (the round's own timeout).  Giving up releases
  the handle (NIXL cancels what it still holds); while NIXL refuses that, the write keeps
  polling and trying: the worker stays on it, so the room's source rows stay staged and the
  receiver's blocks stay quarantined (its sender acknowledges the abort only after the write
  ended) until the transfer is really over, the peer is gone or the process exits;
* the agent is used by several worker threads at once: it runs in NIXL's strict thread mode.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import struct
import threading
import time
from typing import Any

import numpy as np
import torch

from embxfer.core import PoolLayout

from .buffers import PoolBuffers

SCHEME = "nixl"
INSTALL_HINT = (
    "install it with `pip install 'embxfer[nixl]'` (on a CPU-only host install the CPU torch wheel "
    "first, e.g. `pip install torch==2.13.0`, or pip pulls a CUDA build)"
)
_ENVELOPE = struct.Struct("<4sBI")  # magic, memory kind (0 DRAM, 1 VRAM), device id; then the agent metadata
_MAGIC = b"EXN1"
_MEMORY_KINDS = ("DRAM", "VRAM")
MAX_GONE = 4096
RELEASE_RETRY = 1.0  # s between attempts to release a handle NIXL still holds


class NixlUnavailable(RuntimeError):
    """NIXL cannot be imported or started here; the message says how to fix it."""


def _has_rdma_device() -> bool:
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def load_nixl(verbose: bool = False) -> Any:
    """NIXL's Python API: the CUDA 12 wheel, the CUDA 13 one, or the meta package."""
    if not verbose:
        os.environ.setdefault("NIXL_LOG_LEVEL", "ERROR")  # its C++ side logs INFO lines at start-up
    if not _has_rdma_device():
        # UCX's InfiniBand module, loaded where there is no RDMA device to use, brings the
        # wheel's own libnl beside the system's (libibverbs' providers): the process then
        # crashes as it exits (SIGSEGV in rtnl_tc_unregister).  Leave it out unless told.
        os.environ.setdefault("UCX_MODULES", "^ib")
    # NIXL connects to a receiver as its metadata is loaded, holding the agent's lock: to an
    # address that drops SYNs that is TCP's whole SYN back-off (~2 min) during which every
    # write of this process waits.  One retransmission: a silent peer fails in ~3 s.
    os.environ.setdefault("UCX_TCP_SYN_CNT", "1")
    problems = []
    for module in ("nixl_cu12._api", "nixl_cu13._api", "nixl._api"):
        try:
            api = importlib.import_module(module)
        except (ImportError, OSError) as error:
            problems.append(f"{module}: {error}")
            continue
        if not verbose:
            logging.getLogger("nixl").setLevel(logging.WARNING)  # (it logs INFO to stdout otherwise)
        return api
    raise NixlUnavailable(f"NIXL is not available ({'; '.join(problems)}); {INSTALL_HINT}")


def _memory_kind(tensor: torch.Tensor) -> tuple[str, int]:
    if tensor.device.type == "cpu":
        return "DRAM", 0
    return "VRAM", tensor.device.index or 0


class NixlEngine:
    """One NIXL agent (UCX backend) per process: the receiver's pool registration and
    metadata, or the sender's writes (a ``WriteEngine`` for ``BatchWriter``)."""

    name = "nixl WRITE"
    needs_registration = True  # NIXL reads only memory registered with it
    host_memory_only = False  # it registers device memory too
    inline_bytes = 0  # a write may wait on a peer: always on a worker
    notes = True  # each write's notification names the rounds it carries

    def __init__(self, role: str, *, stuck_after: float = 60.0, verbose: bool = False) -> None:
        api = load_nixl(verbose)
        self.agent_name = f"embxfer-{role}-{os.getpid()}-{secrets.token_hex(6)}"
        self.session_id = f"{SCHEME}:{self.agent_name}"
        config = api.nixl_agent_config(enable_prog_thread=True, backends=["UCX"],
                                       sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        try:
            self.agent = api.nixl_agent(self.agent_name, config)
        except Exception as error:  # (its bindings raise their own types)
            raise NixlUnavailable(f"NIXL failed to start an agent: {error}") from None
        if "UCX" not in self.agent.backends:
            raise NixlUnavailable(f"NIXL has no UCX backend here (plugins: {', '.join(self.agent.plugin_list)})")
        self.stuck_after = stuck_after
        self._lock = threading.Lock()
        self._registered: dict[int, tuple[torch.Tensor, Any]] = {}  # address -> (tensor, its NIXL registration)
        self._device_registrations = 0
        self._metadata: dict[str, bytes] = {}  # receiver session -> its envelope, as its PoolLayout sent it
        self._agents: dict[str, tuple[str, str, int]] = {}  # receiver session -> (agent name, memory kind, device)
        self._gone: dict[str, None] = {}  # receiver sessions known gone (the newest MAX_GONE)
        self._loading: dict[str, threading.Lock] = {}  # receiver session -> held while its agent loads
        self._to_remove: list[str] = []  # agents of gone receivers, removed by the next write
        self._closing = False
        self.writes_given_up = 0
        self.handles_held = 0  # handles NIXL would not release yet (their writes still wait on them)

    # --- the receiver's side -------------------------------------------------------------
    def pool_metadata(self, pool: PoolBuffers) -> bytes:
        """Register the pool (once) and return what its ``PoolLayout`` carries."""
        for tensor in (pool.embeddings, pool.fill_ids, pool.mrope, pool.aux):
            self.register(tensor)
        kind, device = _memory_kind(pool.embeddings)
        return _ENVELOPE.pack(_MAGIC, _MEMORY_KINDS.index(kind), device) + bytes(self.agent.get_agent_metadata())

    def notifications(self) -> list[bytes]:
        """Notifications that arrived since the last call (each write sends one)."""
        return [note for notes in self.agent.get_new_notifs().values() for note in notes]

    # --- WriteEngine ---------------------------------------------------------------------
    def register(self, tensor: torch.Tensor) -> None:
        address = tensor.data_ptr()
        if address in self._registered:
            return
        try:
            registration = self.agent.register_memory(tensor)
        except Exception as error:
            raise NixlUnavailable(f"NIXL register_memory of {tensor.numel() * tensor.element_size()} bytes failed: "
                                  f"{error}") from None
        self._registered[address] = (tensor, registration)
        self._device_registrations += tensor.device.type != "cpu"

    def unregister(self, tensor: torch.Tensor) -> None:
        held = self._registered.pop(tensor.data_ptr(), None)
        if held is not None:
            self.agent.deregister_memory(held[1])
            self._device_registrations -= tensor.device.type != "cpu"

    def learn(self, target: str, layout: PoolLayout) -> None:
        """How to reach ``target`` (the receiver's session): its ``PoolLayout``'s metadata."""
        if target not in self._metadata:
            self._metadata[target] = layout.data_plane_metadata

    def _peer(self, target: str) -> tuple[str, str, int]:
        """The receiver's agent, loaded from its metadata on first use (NIXL connects then:
        only writes to this receiver wait for it, never our lock's other users)."""
        self._remove_gone()
        with self._lock:
            known = self._agents.get(target)
            loading = self._loading.setdefault(target, threading.Lock()) if known is None else None
        if known is not None:
            return known
        assert loading is not None
        with loading:
            with self._lock:
                known = self._agents.get(target)
                envelope = self._metadata.get(target, b"")
            if known is not None:
                return known  # (another write loaded it meanwhile)
            if len(envelope) <= _ENVELOPE.size or not target.startswith(SCHEME + ":"):
                raise ValueError(f"receiver {target!r} sent no NIXL metadata (is it on --data-plane nixl?)")
            magic, kind, device = _ENVELOPE.unpack_from(envelope)
            if magic != _MAGIC or kind >= len(_MEMORY_KINDS):
                raise ValueError(f"receiver {target!r} sent metadata that is not an embxfer NIXL envelope")
            name = self.agent.add_remote_agent(envelope[_ENVELOPE.size:])
            name = name.decode() if isinstance(name, bytes) else str(name)
            if f"{SCHEME}:{name}" != target:
                self.agent.remove_remote_agent(name)
                raise ValueError(f"receiver {target!r} sent the metadata of agent {name!r}")
            with self._lock:
                self._loading.pop(target, None)
                if target in self._gone:  # it went while we connected
                    self._to_remove.append(name)
                    raise ValueError(f"receiver {target!r} is gone")
                self._agents[target] = known = (name, _MEMORY_KINDS[kind], device)
            return known

    def _remove_gone(self) -> None:
        """Forget the agents of receivers that are gone (on a writer's thread: NIXL may hold
        its lock for a while, which the control loop must never wait for)."""
        with self._lock:
            names, self._to_remove = self._to_remove, []
        for name in names:
            self.agent.remove_remote_agent(name)

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int], note: bytes = b"") -> int:
        """NIXL WRITEs of every range (one; two when the rows are on a device and the aux
        record in host memory: a request reads one kind of memory), the note with the last;
        0 when written, negative when not (a failed transfer never raises)."""
        peer = self._peer(target)
        groups = self._by_memory(local, remote, lengths)
        for index, (kind, device, group_local, group_remote, group_lengths) in enumerate(groups):
            rc = self._write_group(target, peer, (kind, device), group_local, group_remote, group_lengths,
                                   note if index == len(groups) - 1 else b"")
            if rc:
                return rc
        return 0

    def _write_group(self, target: str, peer: tuple[str, str, int], memory: tuple[str, int], local: list[int],
                     remote: list[int], lengths: list[int], note: bytes) -> int:
        agent_name, remote_kind, remote_device = peer
        local_descs = self.agent.get_xfer_descs(_descs(local, lengths, memory[1]), memory[0])
        remote_descs = self.agent.get_xfer_descs(_descs(remote, lengths, remote_device), remote_kind)
        handle = self.agent.initialize_xfer("WRITE", local_descs, remote_descs, agent_name, note)
        state = self.agent.transfer(handle)
        give_up_at = time.monotonic() + self.stuck_after
        pause = 0.0
        while state == "PROC":
            if self._closing or target in self._gone or time.monotonic() >= give_up_at:
                return self._give_up(handle, target)
            # (NIXL has no blocking wait: a short pause that grows, so a large write does
            # not spin a core, and a small one is seen within microseconds)
            time.sleep(pause)
            pause = min(pause * 2 or 20e-6, 1e-3)
            state = self.agent.check_xfer_state(handle)
        self.agent.release_xfer_handle(handle)
        return 0 if state == "DONE" else -1

    def _by_memory(self, local: list[int], remote: list[int],
                   lengths: list[int]) -> list[tuple[str, int, list[int], list[int], list[int]]]:
        """The ranges grouped by the kind of memory they are read from."""
        if not self._device_registrations:
            return [("DRAM", 0, local, remote, lengths)]  # (the common case: no device memory registered)
        groups: dict[tuple[str, int], tuple[list[int], list[int], list[int]]] = {}
        for address, remote_address, length in zip(local, remote, lengths):
            group = groups.setdefault(self._local_kind(address), ([], [], []))
            group[0].append(address)
            group[1].append(remote_address)
            group[2].append(length)
        return [(kind, device, *group) for (kind, device), group in groups.items()]

    def _give_up(self, handle: Any, target: str) -> int:
        """Release a write that has not completed; while NIXL holds on to it, keep trying
        (the caller's rows and the receiver's blocks stay untouched until it lets go)."""
        with self._lock:
            self.writes_given_up += 1
        held = False
        try:
            while True:
                try:
                    self.agent.release_xfer_handle(handle)
                    return -2
                except Exception:  # still in flight: NIXL could not cancel it yet
                    if self._closing:
                        return -3  # the process is going away: left (``BatchWriter.close`` counts it abandoned)
                    if not held:
                        held = True
                        with self._lock:
                            self.handles_held += 1
                    time.sleep(RELEASE_RETRY)
        finally:
            if held:
                with self._lock:
                    self.handles_held -= 1

    def _local_kind(self, address: int) -> tuple[str, int]:
        for base, (tensor, _) in list(self._registered.items()):  # (the I/O thread may register meanwhile)
            if base <= address < base + tensor.numel() * tensor.element_size():
                return _memory_kind(tensor)
        return "DRAM", 0

    def route(self, target: str) -> tuple["NixlEngine", str]:
        return self, target

    def peer_gone(self, target: str) -> None:
        """``target`` is gone: writes still waiting on it give up, and its agent is forgotten
        (by the next write: this runs on the control loop, which never waits on NIXL)."""
        with self._lock:
            self._gone[target] = None
            while len(self._gone) > MAX_GONE:
                del self._gone[next(iter(self._gone))]
            self._metadata.pop(target, None)
            self._loading.pop(target, None)
            known = self._agents.pop(target, None)
            if known is not None:
                self._to_remove.append(known[0])

    def prune(self, closing: bool = False) -> None:
        if closing:
            self._closing = True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"nixl_peers": len(self._agents), "nixl_writes_given_up": self.writes_given_up,
                    "nixl_handles_held": self.handles_held}

    def stop_waiting(self) -> None:
        """The process is going away: writes still polling return at once (-3), their
        handles left to NIXL; nothing is deregistered (NIXL may still read it)."""
        self._closing = True

    def close(self) -> None:
        """Deregister what is still registered (before the memory goes)."""
        self._closing = True
        for tensor, registration in list(self._registered.values()):
            self.agent.deregister_memory(registration)
        self._registered.clear()


def _descs(addresses: list[int], lengths: list[int], device: int) -> np.ndarray:
    descs = np.empty((len(addresses), 3), dtype=np.uint64)
    descs[:, 0] = addresses
    descs[:, 1] = lengths
    descs[:, 2] = device
    return descs
