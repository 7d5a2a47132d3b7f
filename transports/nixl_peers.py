"""The receivers a NIXL sender writes to: what each one's ``PoolLayout`` said (its agent
metadata, in an envelope naming the pool's memory kind), which agents are loaded, and which
receivers are gone.

NIXL connects to a receiver as its metadata is loaded (``add_remote_agent``), holding the
agent's own lock: only writes to that receiver wait on our side (a lock per receiver while it
loads), a receiver that could not be loaded is not tried again for LOAD_RETRY, and agents are
removed on a writer's thread (never the control loop's) once no write uses them.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("embxfer")
SCHEME = "nixl"
ENVELOPE = struct.Struct("<4sBI")  # magic, memory kind (0 DRAM, 1 VRAM), device id; then the agent metadata
MAGIC = b"EXN1"
MEMORY_KINDS = ("DRAM", "VRAM")
MAX_GONE = 4096  # receiver sessions remembered as gone
LOAD_RETRY = 10.0  # s before a receiver whose agent could not be loaded (connected) is tried again

Peer = tuple[str, str, int]  # (agent name, memory kind of its pool, device)


def envelope(kind: str, device: int, metadata: bytes) -> bytes:
    """What a receiver's ``PoolLayout`` carries: its pool's memory and its agent's metadata."""
    return ENVELOPE.pack(MAGIC, MEMORY_KINDS.index(kind), device) + metadata


class NixlPeers:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._metadata: dict[str, bytes] = {}  # receiver session -> its envelope, as its PoolLayout sent it
        self._agents: dict[str, Peer] = {}  # receiver session -> its loaded agent
        self._gone: dict[str, None] = {}  # receiver sessions known gone (the newest MAX_GONE)
        self._loading: dict[str, threading.Lock] = {}  # receiver session -> held while its agent loads
        self._failed: dict[str, tuple[float, str]] = {}  # receiver session -> (retry after, why) for a failed load
        self._to_remove: list[str] = []  # agents of gone or failed receivers, removed by a writer
        self._writing: dict[str, int] = {}  # agent name -> writes in flight to it

    def __len__(self) -> int:
        with self._lock:
            return len(self._agents)

    def learn(self, target: str, metadata: bytes) -> None:
        """How to reach ``target`` (a receiver's session): its ``PoolLayout``'s metadata."""
        with self._lock:
            if target not in self._metadata and target not in self._gone:
                self._metadata[target] = metadata

    def is_gone(self, target: str) -> bool:
        return target in self._gone

    @contextlib.contextmanager
    def writing(self, target: str) -> Iterator[Peer]:
        """``target``'s agent (loaded on first use) for the length of one write."""
        peer = self._reach(target)
        with self._lock:
            self._writing[peer[0]] = self._writing.get(peer[0], 0) + 1
        try:
            yield peer
        finally:
            with self._lock:
                self._writing[peer[0]] -= 1
                if not self._writing[peer[0]]:
                    del self._writing[peer[0]]

    def _reach(self, target: str) -> Peer:
        self.remove_gone()
        with self._lock:
            known = self._agents.get(target)
            if known is None:
                failed = self._failed.get(target)
                if failed is not None and time.monotonic() < failed[0]:
                    raise ValueError(f"receiver {target!r} could not be reached {LOAD_RETRY:g} s ago or less: {failed[1]}")
                loading = self._loading.setdefault(target, threading.Lock())
        if known is not None:
            return known
        with loading:
            with self._lock:
                known = self._agents.get(target)
                sent = self._metadata.get(target, b"")
            if known is not None:
                return known  # (another write loaded it meanwhile)
            if len(sent) <= ENVELOPE.size or not target.startswith(SCHEME + ":"):
                raise ValueError(f"receiver {target!r} sent no NIXL metadata (is it on --data-plane nixl?)")
            magic, kind, device = ENVELOPE.unpack_from(sent)
            if magic != MAGIC or kind >= len(MEMORY_KINDS):
                raise ValueError(f"receiver {target!r} sent metadata that is not an embxfer NIXL envelope")
            try:
                name = self.agent.add_remote_agent(sent[ENVELOPE.size:])
            except Exception as error:
                with self._lock:
                    self._failed[target] = (time.monotonic() + LOAD_RETRY, f"{type(error).__name__}: {error}")
                raise
            name = name.decode() if isinstance(name, bytes) else str(name)
            if f"{SCHEME}:{name}" != target:
                self._remove(name)
                raise ValueError(f"receiver {target!r} sent the metadata of agent {name!r}")
            with self._lock:
                self._loading.pop(target, None)
                self._failed.pop(target, None)
                self._to_remove = [other for other in self._to_remove if other != name]  # (loaded afresh)
                if target in self._gone:  # it went while we connected
                    self._to_remove.append(name)
                    raise ValueError(f"receiver {target!r} is gone")
                self._agents[target] = known = (name, MEMORY_KINDS[kind], device)
            return known

    def forget(self, target: str, disconnect: bool) -> None:
        """Load ``target``'s agent again at the next write (NIXL may have invalidated it: a
        request to it raised; loading the same metadata again is allowed); ``disconnect``:
        remove it first, dropping its connection (a transfer to it failed or was given up)."""
        with self._lock:
            known = self._agents.pop(target, None)
            if known is not None and disconnect:
                self._to_remove.append(known[0])

    def gone(self, target: str) -> None:
        """``target`` is gone: writes still waiting on it give up, and its agent is removed
        by a writer (this runs on the control loop, which never waits on NIXL)."""
        with self._lock:
            self._gone[target] = None
            while len(self._gone) > MAX_GONE:
                del self._gone[next(iter(self._gone))]
            self._metadata.pop(target, None)
            self._loading.pop(target, None)
            self._failed.pop(target, None)
            known = self._agents.pop(target, None)
            if known is not None:
                self._to_remove.append(known[0])

    def remove_gone(self) -> None:
        """Remove the agents of receivers gone or forgotten; one still written to waits for
        its last write."""
        with self._lock:
            busy = {name for name, count in self._writing.items() if count}
            names = [name for name in self._to_remove if name not in busy]
            self._to_remove = [name for name in self._to_remove if name in busy]
        for name in names:
            self._remove(name)

    def _remove(self, name: str) -> None:
        try:
            self.agent.remove_remote_agent(name)
        except Exception as error:  # (NIXL may have invalidated it itself: a receiver that disconnected)
            log.info("NIXL agent %s was already gone: %s", name, error)
