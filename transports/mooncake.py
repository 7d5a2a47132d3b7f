"""Mooncake ``TransferEngine`` data plane: registered buffers, batched writes of extents.

Facts this module is built on (measured on these machines, see the README):
* every engine call returns an int, 0 for success, negative for failure — it never raises;
* a write to a hung peer blocks for ``MC_TRANSFER_TIMEOUT`` (>= 5 s), so writes run on
  worker threads, never on the control loop;
* a write outside the peer's registered range fails (-1) and can leave that TCP lane
  broken, so every remote range is checked against the peer's pool first, and a failed
  write is retried once (rewriting rows to slots the room still owns is safe).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._mooncake_ports import PORTS_PER_ENGINE, free_ports, pinned_range, ports_busy_message, range_problem
from .buffers import PoolBuffers

SLOW_FAILURE = 0.9  # s: a write failing slower than this is a peer not answering, not retried

INSTALL_HINT = (
    "install it with `pip install 'embxfer[mooncake]'` (CPU-only hosts: "
    "`pip install mooncake-transfer-engine-non-cuda` and `apt-get install -y libibverbs1`)"
)


class MooncakeUnavailable(RuntimeError):
    """The engine cannot be imported or initialised; the message says how to fix it."""


@contextlib.contextmanager
def _quiet_stderr(quiet: bool) -> Iterator[None]:
    """Silence fd 2 (glog writes there, not to ``sys.stderr``) while the engine starts."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _wait(seconds: float, cancelled: Callable[[], bool] | None) -> bool:
    """Wait ``seconds`` (a start-up retry's pause), checking ``cancelled`` every 0.1 s;
    False when it turned true."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if cancelled is not None and cancelled():
            return False
        time.sleep(min(left, 0.1))
    return not (cancelled is not None and cancelled())


def load_transfer_engine() -> Any:
    try:
        from mooncake.engine import TransferEngine  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except (ImportError, OSError) as error:
        raise MooncakeUnavailable(f"Mooncake transfer engine is not available ({error}); {INSTALL_HINT}") from None
    return TransferEngine


class MooncakeEngine:
    """One ``TransferEngine`` per process, in P2P handshake mode (no metadata server)."""

    name = "mooncake batch_transfer_sync_write"
    needs_registration = True  # the engine reads only memory registered with it
    host_memory_only = False  # (registered device memory too, where the engine is built for it)
    inline_bytes = 0  # a write may block for seconds (a peer that does not answer): always on a worker
    notes = False

    def __init__(self, host: str = "127.0.0.1", protocol: str = "tcp", device: str = "", verbose: bool = False,
                 *, retry_for: float = 0.0, cancelled: Callable[[], bool] | None = None) -> None:
        """``retry_for``: while Mooncake finds no free port in its range (a quick restart
        within a pinned range: the kernel holds the old ports up to 60 s), try again with a
        fresh engine every second for up to that many seconds; ``cancelled()`` stops it."""
        if not verbose:
            # glog is chatty (ERROR is its quietest level; read at engine creation)
            os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
        # a peer that never answers would hold a write ~5 s per attempt (the default), and
        # handshakes are serialised: an advertised address nobody answers stalls every peer
        os.environ.setdefault("MC_HANDSHAKE_CONNECT_TIMEOUT", "1")
        ports = pinned_range()
        problem = range_problem(ports) if ports is not None else None
        if problem is not None:
            raise MooncakeUnavailable(problem)
        engine_class = load_transfer_engine()
        started = time.monotonic()
        while True:
            with _quiet_stderr(not verbose):
                # even at ERROR, glog prints two harmless lines at start-up; the rc says if it failed
                self.engine = engine_class()
                rc = self.engine.initialize(host, "P2PHANDSHAKE", protocol, device)
            if rc == 0:
                break
            # a failed engine may still hold the port it did bind: drop it before trying again
            del self.engine
            gc.collect()
            waited = time.monotonic() - started
            if ports is None or free_ports(ports) >= PORTS_PER_ENGINE:
                raise MooncakeUnavailable(
                    f"Mooncake failed to initialise (initialize returned {rc}) for protocol {protocol!r}"
                    f"{' device ' + repr(device) if device else ''} on {host}"
                )
            if waited + 1.0 > retry_for or not _wait(1.0, cancelled):
                raise MooncakeUnavailable(ports_busy_message(ports, time.monotonic() - started))
        self.protocol = protocol
        self.session_id = f"{host}:{self.engine.get_rpc_port()}"
        self._registered: dict[int, int] = {}

    def register(self, tensor: torch.Tensor) -> None:
        address, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        rc = self.engine.register_memory(address, nbytes)
        if rc != 0:
            raise MooncakeUnavailable(f"register_memory of {nbytes} bytes returned {rc}")
        self._registered[address] = nbytes

    def unregister(self, tensor: torch.Tensor) -> None:
        address = tensor.data_ptr()
        if self._registered.pop(address, None) is not None:
            self.engine.unregister_memory(address)

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int], note: bytes = b"") -> int:
        """One batch; a quick failure is retried once (a broken TCP lane), a slow one is not
        (a peer that does not answer).  Returns the engine's code (0 = written)."""
        started = time.monotonic()
        rc = int(self.engine.batch_transfer_sync_write(target, local, remote, lengths))
        if rc != 0 and time.monotonic() - started < SLOW_FAILURE:
            rc = int(self.engine.batch_transfer_sync_write(target, local, remote, lengths))
        return rc

    def learn(self, target: str, layout: Any) -> None:
        """(The session is the peer's address: nothing to learn from the layout.)"""

    def route(self, target: str) -> tuple["MooncakeEngine", str]:
        return self, target

    def stats(self) -> dict[str, int]:
        return {}

    def prune(self, closing: bool = False) -> None:
        """Nothing to let go of: Mooncake keeps one connection a peer and drops it itself (the
        engine outlives the writer: the caller may share it)."""


def register_pool(engine: MooncakeEngine, pool: PoolBuffers) -> None:
    for tensor in (pool.embeddings, pool.fill_ids, pool.mrope, pool.aux):
        engine.register(tensor)


def pool_addresses(pool: PoolBuffers) -> dict[str, int]:
    """The pool's size and buffer addresses, for ``Receiver.pool_layout_message``."""
    return dict(
        pool_slots=int(pool.fill_ids.shape[0]), embeddings_addr=pool.embeddings.data_ptr(),
        fill_ids_addr=pool.fill_ids.data_ptr(), mrope_addr=pool.mrope.data_ptr(), aux_addr=pool.aux.data_ptr(),
    )
