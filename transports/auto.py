"""The ``auto`` data plane: shared memory to a receiver on this host, Mooncake to the others.

A receiver on ``auto`` keeps its pool in a memfd (when this platform has one), registers it
with Mooncake too, and advertises both sessions in one: ``<shm session>|<mooncake session>``
(only the Mooncake one when its pool is private memory).  The sender decides once per
receiver session: the same host identity and a pool it can open go over shared memory;
anything else (another host, another user, a pool it cannot open) over Mooncake, with the
reason logged once.  Both sides must say ``auto`` (the registration's configuration check).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from .buffers import PoolBuffers
from .shm import SharedPoolBuffers, ShmEngine, ShmSession, ShmUnavailable

log = logging.getLogger("embxfer")
SEPARATOR = "|"
MAX_ROUTES = 4096  # receiver sessions remembered (one per receiver process)


def auto_session(shm_session: str | None, mooncake_session: str) -> str:
    """What an ``auto`` receiver advertises."""
    return mooncake_session if shm_session is None else f"{shm_session}{SEPARATOR}{mooncake_session}"


def auto_engine(mooncake: Any) -> "AutoEngine":
    """The sender's ``auto`` engine over ``mooncake``, with shared memory where this process has it."""
    try:
        return AutoEngine(mooncake, ShmEngine())
    except ShmUnavailable as error:
        return AutoEngine(mooncake, None, str(error))


def shared_pool_or_private(settings: Any) -> PoolBuffers:
    """An ``auto`` receiver's pool: in a memfd where this platform has one, else private memory."""
    try:
        return SharedPoolBuffers(settings)
    except ShmUnavailable as error:
        log.info("the pool is private memory (every sender writes over Mooncake): %s", error)
        return PoolBuffers(settings)


class AutoEngine:
    """A ``WriteEngine`` that routes each receiver to shared memory or to Mooncake."""

    name = "auto"
    needs_registration = True  # Mooncake reads only registered memory (shared memory reads any)
    host_memory_only = True  # a receiver may be routed to shared memory: rows on a device come to the host once
    inline_bytes = 0  # (per route: ``route`` returns the engine whose own limit applies)
    notes = False

    def __init__(self, mooncake: Any, shm: ShmEngine | None, shm_problem: str = "") -> None:
        """``shm``: None where this process cannot use shared memory (``shm_problem`` says why)."""
        self.mooncake = mooncake
        self.shm = shm
        self.shm_problem = shm_problem
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[Any, str]] = {}  # receiver session -> (engine, its target)
        self.receivers_on_shm = 0
        self.receivers_on_mooncake = 0

    def route(self, target: str) -> tuple[Any, str]:
        with self._lock:
            chosen = self._routes.get(target)
        if chosen is None:
            chosen = self._choose(target)
            with self._lock:
                self._routes[target] = chosen
                if chosen[0] is self.shm:
                    self.receivers_on_shm += 1
                else:
                    self.receivers_on_mooncake += 1
        return chosen

    def _choose(self, target: str) -> tuple[Any, str]:
        shm_part, separator, mooncake_part = target.partition(SEPARATOR)
        if not separator:
            return self.mooncake, target  # the receiver's pool is private memory
        if self.shm is None:
            why = self.shm_problem
        else:
            try:
                session = ShmSession.parse(shm_part)
                if session.identity != self.shm.identity:
                    return self.mooncake, mooncake_part  # another host: the expected case, nothing to say
                self.shm.check(shm_part)
                return self.shm, shm_part
            except (ShmUnavailable, OSError, ValueError) as error:  # (OSError, ValueError: the pool's mmap failed)
                why = str(error)
        log.warning("receiver %s: over Mooncake, not shared memory: %s", mooncake_part, why)
        return self.mooncake, mooncake_part

    def learn(self, target: str, layout: Any) -> None:
        """(``route`` returns the engine that writes: it learns, not this one.)"""

    def register(self, tensor: torch.Tensor) -> None:
        self.mooncake.register(tensor)

    def unregister(self, tensor: torch.Tensor) -> None:
        self.mooncake.unregister(tensor)

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int], note: bytes = b"") -> int:
        engine, routed = self.route(target)
        return int(engine.write(routed, local, remote, lengths))

    def prune(self, closing: bool = False) -> None:
        """Forget the routes of receivers whose pool is gone (each session is a new process's)."""
        if self.shm is not None:
            self.shm.prune(closing)
        with self._lock:
            for target, (engine, routed) in list(self._routes.items()):
                if closing or (engine is self.shm and not self.shm.is_mapped(routed)):
                    del self._routes[target]
            while len(self._routes) > MAX_ROUTES:  # receivers over Mooncake that restarted: the oldest
                del self._routes[next(iter(self._routes))]
        self.mooncake.prune(closing)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"receivers_on_shm": self.receivers_on_shm, "receivers_on_mooncake": self.receivers_on_mooncake}
