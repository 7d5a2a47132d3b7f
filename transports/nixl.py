"""NIXL data plane: each round is one NIXL WRITE of its coalesced extents, with a notification.

Facts this module is built on (measured on these machines with ``nixl-cu12`` 1.5.1, UCX
backend, CPU memory; see the README):
* the receiver registers its pool once and sends its agent metadata in ``PoolLayout``
  (over our control plane: no etcd, no NIXL listener port).  Memory registered after the
  metadata went out is not visible to the peer (``NIXL_ERR_NOT_FOUND``), so nothing is
  registered on the receiver after that;
* a transfer has no deadline of its own (ai-dynamo/nixl #2047): a write polls its handle
  and gives up after ``stuck_after`` seconds (the round's own timeout).  Giving up releases
  the handle (NIXL cancels what it still holds) and drops the connection; bytes already on
  the wire may land all the same, so the write reports ``GIVEN_UP`` and the core never
  acknowledges nor aborts that room to that receiver (its blocks wait out their whole
  quarantine).  While NIXL refuses the release the worker stays on it, so the room's rows
  stay staged;
* NIXL connects to a receiver as its metadata is loaded, holding the agent's lock (every
  call of this process waits): ``UCX_TCP_SYN_CNT=1`` bounds that to ~3 s for an address that
  drops SYNs (the receivers' agents: nixl_peers.py);
* the agent is used by several worker threads at once: it runs in NIXL's strict thread mode.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import threading
import time
from typing import Any

import numpy as np
import torch

from embxfer.core import PoolLayout

from .batch_writer import GIVEN_UP
from .buffers import PoolBuffers
from .nixl_peers import SCHEME, NixlPeers, Peer, envelope

INSTALL_HINT = (
    "install it with `pip install 'embxfer[nixl]'` (on a CPU-only host install the CPU torch wheel "
    "first, e.g. `pip install torch==2.13.0`, or pip pulls a CUDA build)"
)
MAX_NOTES = 65536  # notes waiting for the client of their sender
MAX_NOTE_WRITES = 1024  # rounds one note may name (a merged write carries at most this many ranges)
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
        # (address, bytes) -> [tensor, its NIXL registration, users]; changed under its own lock
        self._registration_lock = threading.Lock()
        self._registered: dict[tuple[int, int], list[Any]] = {}
        self._device_regions: tuple[tuple[int, int, str, int], ...] = ()
        self.peers = NixlPeers(self.agent)
        self._notes: dict[str, list[bytes]] = {}  # sender session -> notes not yet taken
        self._notes_waiting = 0
        self.notes_dropped = 0
        self._closing = False
        self.writes_given_up = 0
        self.handles_held = 0  # handles NIXL would not release yet (their writes still wait on them)

    # --- the receiver's side -------------------------------------------------------------
    def pool_metadata(self, pool: PoolBuffers) -> bytes:
        """Register the pool (once) and return what its ``PoolLayout`` carries."""
        for tensor in (pool.embeddings, pool.fill_ids, pool.mrope, pool.aux):
            self.register(tensor)
        return envelope(*_memory_kind(pool.embeddings), bytes(self.agent.get_agent_metadata()))

    def notes_from(self, session: str) -> list[bytes]:
        """Notes that the sender ``session`` (its ``nixl:<agent>``) sent since the last call.
        Several clients may share this agent (one pool, one client per encode server): each
        takes only its own sender's, the others wait for theirs (at most MAX_NOTES in all)."""
        with self._lock:
            for agent, notes in self.agent.get_new_notifs().items():
                name = agent.decode() if isinstance(agent, bytes) else str(agent)
                self._notes.setdefault(f"{SCHEME}:{name}", []).extend(notes)
                self._notes_waiting += len(notes)
            while self._notes_waiting > MAX_NOTES:  # a sender nobody here reads: its oldest go
                fullest = max(self._notes, key=lambda key: len(self._notes[key]))
                dropped = len(self._notes[fullest]) // 2 or len(self._notes[fullest])
                del self._notes[fullest][:dropped]
                self._notes_waiting -= dropped
                self.notes_dropped += dropped
            mine = self._notes.pop(session, [])
            self._notes_waiting -= len(mine)
            return mine

    # --- WriteEngine ---------------------------------------------------------------------
    def register(self, tensor: torch.Tensor) -> None:
        """Register ``tensor``'s memory (counted: the same memory staged twice is registered
        once and let go with its last user)."""
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        with self._registration_lock:
            held = self._registered.get(key)
            if held is not None:
                held[2] += 1
                return
            try:
                registration = self.agent.register_memory(tensor)
            except Exception as error:
                raise NixlUnavailable(f"NIXL register_memory of {key[1]} bytes failed: {error}") from None
            self._registered[key] = [tensor, registration, 1]
            self._publish_regions()

    def unregister(self, tensor: torch.Tensor) -> None:
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        with self._registration_lock:
            held = self._registered.get(key)
            if held is None:
                return
            held[2] -= 1
            if held[2]:
                return
            del self._registered[key]
            self._publish_regions()
            self.agent.deregister_memory(held[1])

    def _publish_regions(self) -> None:
        """The registered device memory as an immutable snapshot the writers read unlocked."""
        self._device_regions = tuple(
            (address, address + nbytes, *_memory_kind(tensor))
            for (address, nbytes), (tensor, _, _) in self._registered.items() if tensor.device.type != "cpu")

    def learn(self, target: str, layout: PoolLayout) -> None:
        """How to reach ``target`` (the receiver's session): its ``PoolLayout``'s metadata."""
        self.peers.learn(target, layout.data_plane_metadata)

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int], note: bytes = b"") -> int:
        """NIXL WRITEs of every range (one; two when the rows are on a device and the aux
        record in host memory: a request reads one kind of memory), the note with the last;
        0 when written, GIVEN_UP when not complete within ``stuck_after`` (the handle released,
        the connection dropped, its bytes may still land), -1 when NIXL says it failed."""
        with self.peers.writing(target) as peer:
            try:
                give_up_at = time.monotonic() + self.stuck_after  # (one deadline for the whole write)
                groups = self._by_memory(local, remote, lengths)
                for index, (kind, device, group_local, group_remote, group_lengths) in enumerate(groups):
                    rc = self._write_group(target, peer, (kind, device), group_local, group_remote, group_lengths,
                                           note if index == len(groups) - 1 else b"", give_up_at)
                    if rc:
                        self.peers.forget(target, disconnect=True)
                        return rc
                return 0
            except Exception:
                self.peers.forget(target, disconnect=False)
                raise

    def _write_group(self, target: str, peer: Peer, memory: tuple[str, int], local: list[int],
                     remote: list[int], lengths: list[int], note: bytes, give_up_at: float) -> int:
        agent_name, remote_kind, remote_device = peer
        local_descs = self.agent.get_xfer_descs(_descs(local, lengths, memory[1]), memory[0])
        remote_descs = self.agent.get_xfer_descs(_descs(remote, lengths, remote_device), remote_kind)
        handle = self.agent.initialize_xfer("WRITE", local_descs, remote_descs, agent_name, note)
        state = self.agent.transfer(handle)
        pause = 0.0
        while state == "PROC":
            if self._closing or self.peers.is_gone(target) or time.monotonic() >= give_up_at:
                return self._give_up(handle)
            # (NIXL has no blocking wait: a short pause that grows, so a large write does
            # not spin a core, and a small one is seen within microseconds)
            time.sleep(pause)
            pause = min(pause * 2 or 20e-6, 1e-3)
            state = self.agent.check_xfer_state(handle)
        if not self._release(handle):
            return -3
        return 0 if state == "DONE" else -1

    def _give_up(self, handle: Any) -> int:
        """Release a write that has not completed (NIXL cancels what it still holds; a
        transfer already on the wire may land all the same: the caller reports GIVEN_UP,
        and the core never acknowledges that room to the receiver, whose blocks wait out
        their quarantine)."""
        with self._lock:
            self.writes_given_up += 1
        return GIVEN_UP if self._release(handle) else -3

    def _release(self, handle: Any) -> bool:
        """Release ``handle``; while NIXL refuses (still in flight), keep trying: the
        caller's rows stay staged until it lets go.  False: the process is going away first
        (the handle is left; ``BatchWriter.close`` counts its write abandoned)."""
        held = False
        try:
            while True:
                try:
                    self.agent.release_xfer_handle(handle)
                    return True
                except Exception:
                    if self._closing:
                        return False
                    if not held:
                        held = True
                        with self._lock:
                            self.handles_held += 1
                    time.sleep(RELEASE_RETRY)
        finally:
            if held:
                with self._lock:
                    self.handles_held -= 1

    def _by_memory(self, local: list[int], remote: list[int],
                   lengths: list[int]) -> list[tuple[str, int, list[int], list[int], list[int]]]:
        """The ranges grouped by the kind of memory they are read from."""
        regions = self._device_regions
        if not regions:
            return [("DRAM", 0, local, remote, lengths)]  # (the common case: no device memory registered)
        groups: dict[tuple[str, int], tuple[list[int], list[int], list[int]]] = {}
        for address, remote_address, length in zip(local, remote, lengths):
            kind = next(((k, d) for start, end, k, d in regions if start <= address < end), ("DRAM", 0))
            group = groups.setdefault(kind, ([], [], []))
            group[0].append(address)
            group[1].append(remote_address)
            group[2].append(length)
        return [(kind, device, *group) for (kind, device), group in groups.items()]

    def route(self, target: str) -> tuple["NixlEngine", str]:
        return self, target

    def peer_gone(self, target: str) -> None:
        """``target`` is gone: writes still waiting on it give up, its agent is removed."""
        self.peers.gone(target)

    def prune(self, closing: bool = False) -> None:
        if closing:
            self._closing = True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"nixl_peers": len(self.peers), "nixl_writes_given_up": self.writes_given_up,
                    "nixl_handles_held": self.handles_held, "nixl_notes_dropped": self.notes_dropped}

    def stop_waiting(self) -> None:
        """The process is going away: writes still polling return at once (-3), their
        handles left to NIXL; nothing is deregistered (NIXL may still read it)."""
        self._closing = True

    def close(self) -> None:
        """Deregister what is still registered (before the memory goes)."""
        self._closing = True
        with self._registration_lock:
            held, self._registered = list(self._registered.values()), {}
            self._publish_regions()
        for _, registration, _ in held:
            self.agent.deregister_memory(registration)


def _descs(addresses: list[int], lengths: list[int], device: int) -> np.ndarray:
    descs = np.empty((len(addresses), 3), dtype=np.uint64)
    descs[:, 0] = addresses
    descs[:, 1] = lengths
    descs[:, 2] = device
    return descs
