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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import torch

from embxfer.core import Allocation, Allocator, PoolLayout, Settings, WriteRows
from embxfer.specs.schemas import AUX_WORDS

from ._mooncake_ports import PORTS_PER_ENGINE, free_ports, pinned_range, ports_busy_message, range_problem
from .buffers import PoolBuffers, SourceRows

ARENA_BYTES = 32 << 20  # the registered staging arena for small rooms
ARENA_BLOCK = 4096
SMALL_ROOM_BYTES = 1 << 20  # rooms up to this size are copied into the arena, not registered
PEER_WRITES = 3  # writes in flight to one peer
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

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int]) -> int:
        """One batch; a quick failure is retried once (a broken TCP lane), a slow one is not
        (a peer that does not answer).  Returns the engine's code (0 = written)."""
        started = time.monotonic()
        rc = int(self.engine.batch_transfer_sync_write(target, local, remote, lengths))
        if rc != 0 and time.monotonic() - started < SLOW_FAILURE:
            rc = int(self.engine.batch_transfer_sync_write(target, local, remote, lengths))
        return rc


def register_pool(engine: MooncakeEngine, pool: PoolBuffers) -> None:
    for tensor in (pool.embeddings, pool.fill_ids, pool.mrope, pool.aux):
        engine.register(tensor)


def pool_addresses(pool: PoolBuffers) -> dict[str, int]:
    """The pool's size and buffer addresses, for ``Receiver.pool_layout_message``."""
    return dict(
        pool_slots=int(pool.fill_ids.shape[0]), embeddings_addr=pool.embeddings.data_ptr(),
        fill_ids_addr=pool.fill_ids.data_ptr(), mrope_addr=pool.mrope.data_ptr(), aux_addr=pool.aux.data_ptr(),
    )


@attrs.define
class _Staged:
    source: SourceRows | _ArenaRows
    aux: torch.Tensor
    arena_blocks: Allocation | None = None  # set when the rows were copied into the arena


@attrs.define
class _ArenaRows:
    """A small room's rows copied into the registered staging arena (what ``_batch`` reads)."""

    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    mrope: torch.Tensor
    num_tokens: int


class _StagingArena:
    """One registered buffer small rooms are copied into: registering a room's tensors costs
    ~45 µs each (four a room, and as much again to unregister), copying a few KiB far less."""

    def __init__(self, engine: MooncakeEngine) -> None:
        self.buffer = torch.empty(ARENA_BYTES, dtype=torch.uint8)
        engine.register(self.buffer)
        self.blocks = Allocator(Settings(block_size=1, default_blocks=1, pool_blocks=ARENA_BYTES // ARENA_BLOCK))

    def stage(self, source: SourceRows) -> tuple[_ArenaRows, torch.Tensor, Allocation] | None:
        parts = (source.embeddings, source.fill_ids, source.mrope, torch.zeros(AUX_WORDS, dtype=torch.int64))
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += -(-part.numel() * part.element_size() // 64) * 64  # 64-byte aligned sections
        if total > SMALL_ROOM_BYTES:
            return None
        blocks = self.blocks.alloc(-(-total // ARENA_BLOCK))
        if blocks is None:
            return None  # the arena is full: this room registers its own tensors
        if len(blocks.extents) != 1:
            self.blocks.free(blocks)
            return None
        base = blocks.extents[0][0] * ARENA_BLOCK
        views = []
        for part, offset in zip(parts, offsets):
            nbytes = part.numel() * part.element_size()
            view = self.buffer[base + offset: base + offset + nbytes].view(part.dtype).view(part.shape)
            view.copy_(part)
            views.append(view)
        return _ArenaRows(views[0], views[1], views[2], source.num_tokens), views[3], blocks


class MooncakeWriter:
    """The sender's data plane: stage rows, write rounds on worker threads, report back.

    ``on_done(write, error)`` is called from a worker thread; the caller hands it to its
    control loop (it must not touch the core from there).
    """

    def __init__(self, engine: MooncakeEngine, block_size: int, workers: int = 6) -> None:
        self.engine = engine
        self.block_size = block_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embxfer-write")
        self._staged: dict[int, _Staged] = {}
        self._arena: _StagingArena | None = None
        # at most PEER_WRITES writes to one peer at a time, the rest in order behind them: a
        # peer that does not answer holds that many workers (for a connect timeout a write),
        # never all of them
        self._target_lock = threading.Lock()
        self._target_running: dict[str, int] = {}
        self._target_queues: dict[str, deque[Callable[..., None]]] = {}
        # rooms that failed: their writes not yet started never start (each would wait out
        # Mooncake's timeout against a peer that does not answer, pinning a worker)
        self._cancelled: set[int] = set()
        self._closing = False
        self._in_engine = 0  # writes inside the engine now (they cannot be interrupted)
        self._unfinished = 0  # writes submitted whose on_done has not returned yet
        self._writes_cancelled = 0
        self._idle = threading.Condition(self._target_lock)

    def stage(self, room: int, source: SourceRows) -> None:
        with self._target_lock:
            self._cancelled.discard(room)  # a new room under a failed one's id
        if self._arena is None:
            self._arena = _StagingArena(self.engine)  # registered once, on first use
        copied = self._arena.stage(source)
        if copied is not None:
            rows, aux, blocks = copied
            self._staged[room] = _Staged(rows, aux, blocks)
            return
        aux = torch.zeros(AUX_WORDS, dtype=torch.int64)
        for tensor in (source.embeddings, source.fill_ids, source.mrope, aux):
            self.engine.register(tensor)
        self._staged[room] = _Staged(source, aux)

    def cancel(self, room: int) -> None:
        """``room`` failed: its writes that have not started end at once, as cancelled
        (until the room id is staged again, for a new room)."""
        if room in self._staged:  # a room with nothing staged has no write to cancel
            with self._target_lock:
                self._cancelled.add(room)

    def release(self, room: int) -> None:
        with self._target_lock:
            self._cancelled.discard(room)  # every write of the room has ended
        staged = self._staged.pop(room, None)
        if staged is None:
            return
        if staged.arena_blocks is not None:
            assert self._arena is not None
            self._arena.blocks.free(staged.arena_blocks)  # no write reads them any more
            return
        for tensor in (staged.source.embeddings, staged.source.fill_ids, staged.source.mrope, staged.aux):
            self.engine.unregister(tensor)

    def submit(self, write: WriteRows, target: str, layout: PoolLayout,
               on_done: Callable[[WriteRows, "str | None"], None]) -> None:
        staged = self._staged.get(write.room)
        if staged is None:
            on_done(write, "no staged rows for the room")
            return
        try:
            batch = self._batch(write, staged, layout)
        except ValueError as error:
            on_done(write, str(error))
            return

        def run(chain: bool = True) -> None:
            with self._target_lock:
                cancelled = self._closing or write.room in self._cancelled
                if not cancelled:
                    self._in_engine += 1
            if cancelled:
                with self._target_lock:
                    self._writes_cancelled += 1
                error: str | None = "cancelled before it started (the room had failed)"
            else:
                try:
                    rc = self.engine.write(target, *batch)
                    error = None if rc == 0 else f"mooncake batch_transfer_sync_write returned {rc}"
                except Exception as raised:  # the worker must survive anything the engine does
                    error = f"mooncake write raised {type(raised).__name__}: {raised}"
                finally:
                    with self._target_lock:
                        self._in_engine -= 1
                        self._idle.notify_all()
            try:
                on_done(write, error)
            finally:
                if chain:
                    self._next_for(target)
                with self._target_lock:
                    self._unfinished -= 1
                    self._idle.notify_all()

        with self._target_lock:
            self._unfinished += 1
            running = self._target_running.get(target, 0)
            if running >= PEER_WRITES:
                self._target_queues.setdefault(target, deque()).append(run)  # a write to it that ends runs this
                return
            self._target_running[target] = running + 1
        self._pool.submit(run)

    def _next_for(self, target: str) -> None:
        with self._target_lock:
            waiting = self._target_queues.get(target)
            if not waiting:
                self._target_queues.pop(target, None)
                self._target_running[target] -= 1
                if not self._target_running[target]:
                    del self._target_running[target]
                return
            following = waiting.popleft()
        try:
            self._pool.submit(following)
        except RuntimeError:  # closing: the pool takes no new work, so finish it here
            following()

    def _batch(self, write: WriteRows, staged: _Staged, layout: PoolLayout) -> tuple[list[int], list[int], list[int]]:
        source = staged.source
        emb_row = source.embeddings.shape[1] * source.embeddings.element_size()
        kinds = (
            (source.embeddings.data_ptr(), layout.embeddings_addr, emb_row),
            (source.fill_ids.data_ptr(), layout.fill_ids_addr, 8),
            (source.mrope.data_ptr(), layout.mrope_addr, 24),
        )
        local: list[int] = []
        remote: list[int] = []
        lengths: list[int] = []
        for first_slot, token_offset, length in write.runs:
            if first_slot < 0 or first_slot + length > layout.pool_slots:
                raise ValueError(f"slots {first_slot}..{first_slot + length} outside the peer's pool of {layout.pool_slots}")
            token = write.sent_tokens + token_offset
            if token + length > source.num_tokens:
                raise ValueError(f"tokens {token}..{token + length} outside the room's {source.num_tokens} rows")
            for local_base, remote_base, row in kinds:
                local.append(local_base + token * row)
                remote.append(remote_base + first_slot * row)
                lengths.append(length * row)
        if write.aux is not None and write.aux_block is not None:
            if not 0 <= write.aux_block * self.block_size < layout.pool_slots:
                raise ValueError(f"aux block {write.aux_block} outside the peer's pool")
            staged.aux.copy_(torch.tensor(write.aux.to_words(), dtype=torch.int64))
            local.append(staged.aux.data_ptr())
            remote.append(layout.aux_addr + write.aux_block * AUX_WORDS * 8)
            lengths.append(AUX_WORDS * 8)
        return local, remote, lengths

    def stats(self) -> dict[str, int]:
        with self._target_lock:
            return {"writes_in_engine": self._in_engine, "writes_cancelled": self._writes_cancelled,
                    "writes_queued": sum(len(q) for q in self._target_queues.values())}

    def close(self, grace: float | None = None) -> int:
        """Stop.  Every write not yet inside the engine ends at once as cancelled (its
        ``on_done`` is called, so the sender settles its room and sends what it owes); writes
        inside the engine get ``grace`` seconds (None: as long as they take).  Returns how many
        were still running then: abandoned, since the engine cannot interrupt them (the
        process should exit rather than wait); their staged rows are kept, as the engine may
        still read them."""
        with self._target_lock:
            self._closing = True
            queued = [run for waiting in self._target_queues.values() for run in waiting]
            self._target_queues.clear()
        for run in queued:  # behind a write that may never end: finish them here, as cancelled
            run(False)
        self._pool.shutdown(wait=False)  # runs not started yet end at once, as cancelled
        deadline = None if grace is None else time.monotonic() + grace
        with self._idle:
            while self._unfinished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._idle.wait(left)
            abandoned = self._unfinished
        if abandoned:
            return abandoned
        for room in list(self._staged):
            self.release(room)
        return 0
