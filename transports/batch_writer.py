"""The sender's data plane over a write engine (Mooncake, or same-host shared memory): stage
a room's rows, write each round's extents as one batch on worker threads, report back.

An engine (``MooncakeEngine``, ``ShmEngine``, ``NixlEngine``) offers ``write(target, local, remote, lengths)``
returning 0 when every range was written (anything else, or raising, is a failed round);
``register``/``unregister`` of the memory it reads (``needs_registration``: Mooncake reads
only registered memory; shared memory reads any), ``name`` for its error messages and
``inline_bytes``: a round up to that size is written at once on the caller's thread, its
``on_done`` called before ``submit`` returns (a small memcpy costs less than handing it to a
worker; a Mooncake write may block for seconds, so it never runs inline).
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import attrs
import torch

from embxfer.core import Allocation, Allocator, PoolLayout, Settings, WriteRows
from embxfer.specs.schemas import AUX_WORDS

from .buffers import SourceRows, settle
from .notes import note_for

ARENA_BYTES = 32 << 20  # the registered staging arena for small rooms
ARENA_BLOCK = 4096
SMALL_ROOM_BYTES = 1 << 20  # rooms up to this size are copied into the arena, not registered
PEER_WRITES = 3  # writes in flight to one peer
MERGED_ENTRIES = 1024  # ranges in one engine call made of several rounds' writes (a round alone may have more)
CANCELLED = "cancelled before it started (the room had failed)"
GIVEN_UP = -2  # what an engine's ``write`` returns for a transfer it gave up and could not stop


class GivenUp(str):
    """A write's error when the engine gave it up without being able to stop it: its bytes
    may still land (``Sender.write_done(..., may_land=True)``)."""
SPLIT_AFTER_FAILURE = 1.0  # s: a merged write failing faster than this is tried again round by round
_AUX_RECORD = struct.Struct(f"<{AUX_WORDS}q")  # one aux record, as the pool's int64 words


class WriteEngine(Protocol):
    name: str
    needs_registration: bool
    host_memory_only: bool  # it cannot read device memory: rows on a device are copied to the host once
    inline_bytes: int  # a write this small runs on the caller's thread (0: never; it may block)
    notes: bool  # ``write`` sends ``note`` (what the write carries) for the receiver to check (NIXL); others ignore it

    def register(self, tensor: torch.Tensor) -> None: ...
    def unregister(self, tensor: torch.Tensor) -> None: ...
    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int], note: bytes = b"") -> int: ...
    # what the receiver's ``PoolLayout`` says (called before each write to ``target``)
    def learn(self, target: str, layout: PoolLayout) -> None: ...
    def prune(self, closing: bool = False) -> None: ...
    # the engine that writes to ``target`` and what it calls it (itself, or one it routes to)
    def route(self, target: str) -> tuple["WriteEngine", str]: ...
    def stats(self) -> dict[str, int]: ...


@attrs.define
class _Staged:
    source: SourceRows | _CopiedRows
    aux: torch.Tensor
    arena_blocks: Allocation | None = None  # set when the rows were copied into the arena


@attrs.define
class _CopiedRows:
    """A small room's rows copied into the registered staging arena (what ``_batch`` reads)."""

    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    mrope: torch.Tensor
    num_tokens: int


class _StagingArena:
    """One registered buffer small rooms are copied into: registering a room's tensors costs
    ~45 µs each (four a room, and as much again to unregister), copying a few KiB far less."""

    def __init__(self, engine: WriteEngine) -> None:
        self.buffer = torch.empty(ARENA_BYTES, dtype=torch.uint8)
        engine.register(self.buffer)
        self.blocks = Allocator(Settings(block_size=1, default_blocks=1, pool_blocks=ARENA_BYTES // ARENA_BLOCK))

    def stage(self, source: "SourceRows | _CopiedRows") -> tuple[_CopiedRows, torch.Tensor, Allocation] | None:
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
        return _CopiedRows(views[0], views[1], views[2], source.num_tokens), views[3], blocks


@attrs.define(eq=False)
class _Pending:
    """A round's write waiting for its turn to a peer."""

    write: WriteRows
    batch: tuple[list[int], list[int], list[int]]  # (local, remote, lengths)
    on_done: Callable[[WriteRows, "str | None"], None]


def _merged(batches: list[tuple[list[int], list[int], list[int]]]) -> tuple[list[int], list[int], list[int]]:
    if len(batches) == 1:
        return batches[0]
    local: list[int] = []
    remote: list[int] = []
    lengths: list[int] = []
    for batch_local, batch_remote, batch_lengths in batches:
        local += batch_local
        remote += batch_remote
        lengths += batch_lengths
    return local, remote, lengths


class BatchWriter:
    """The sender's data plane: stage rows, write rounds on worker threads, report back.

    ``on_done(write, error)`` is called from a worker thread; the caller hands it to its
    control loop (it must not touch the core from there).
    """

    def __init__(self, engine: WriteEngine, block_size: int, workers: int = 6) -> None:
        self.engine = engine
        self.block_size = block_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embxfer-write")
        self._staged: dict[int, _Staged] = {}
        self._unstageable: dict[int, str] = {}  # rooms whose rows the engine cannot read: why
        self._arena: _StagingArena | None = None
        # at most PEER_WRITES writes to one peer at a time, the rest in order behind them: a
        # peer that does not answer holds that many workers (for a connect timeout a write),
        # never all of them
        self._target_lock = threading.Lock()
        self._target_running: dict[str, int] = {}
        self._target_queues: dict[str, tuple[WriteEngine, deque[_Pending]]] = {}
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
        self._unstageable.pop(room, None)
        aux = torch.zeros(AUX_WORDS, dtype=torch.int64)
        rows: SourceRows | _CopiedRows = source.on_host() if self.engine.host_memory_only else source
        if not self.engine.needs_registration:  # the engine reads the caller's tensors where they are
            self._staged[room] = _Staged(rows, aux)
            return
        if rows.embeddings.device.type != "cpu":
            # rows on a device stay there: the engine registers and reads them (never via the
            # host), once the kernels that made them are done (the engine reads outside CUDA's streams)
            settle(rows.embeddings.device)
            registered: list[torch.Tensor] = []
            try:
                for tensor in (rows.embeddings, rows.fill_ids, rows.mrope, aux):
                    self.engine.register(tensor)
                    registered.append(tensor)
            except Exception as error:  # e.g. a Mooncake build without CUDA: this room's writes fail, with why
                for tensor in registered:
                    self.engine.unregister(tensor)
                self._unstageable[room] = f"{self.engine.name} cannot read rows on {rows.embeddings.device}: {error}"
                return
            self._staged[room] = _Staged(rows, aux)
            return
        if self._arena is None:
            self._arena = _StagingArena(self.engine)  # registered once, on first use
        copied = self._arena.stage(rows)
        if copied is not None:
            arena_rows, aux, blocks = copied
            self._staged[room] = _Staged(arena_rows, aux, blocks)
            return
        for tensor in (rows.embeddings, rows.fill_ids, rows.mrope, aux):
            self.engine.register(tensor)
        self._staged[room] = _Staged(rows, aux)

    def cancel(self, room: int) -> None:
        """``room`` failed: its writes that have not started end at once, as cancelled
        (until the room id is staged again, for a new room)."""
        if room in self._staged:  # a room with nothing staged has no write to cancel
            with self._target_lock:
                self._cancelled.add(room)

    def release(self, room: int) -> None:
        with self._target_lock:
            self._cancelled.discard(room)  # every write of the room has ended
        self._unstageable.pop(room, None)
        staged = self._staged.pop(room, None)
        if staged is None:
            return
        if staged.arena_blocks is not None:
            assert self._arena is not None
            self._arena.blocks.free(staged.arena_blocks)  # no write reads them any more
            return
        if self.engine.needs_registration:
            for tensor in (staged.source.embeddings, staged.source.fill_ids, staged.source.mrope, staged.aux):
                self.engine.unregister(tensor)

    def prune(self) -> None:
        """A receiver went away: the engine lets go of what it holds for receivers that are gone."""
        self.engine.prune()

    def submit(self, write: WriteRows, target: str, layout: PoolLayout,
               on_done: Callable[[WriteRows, "str | None"], None]) -> None:
        staged = self._staged.get(write.room)
        if staged is None:
            on_done(write, self._unstageable.get(write.room, "no staged rows for the room"))
            return
        try:
            batch = self._batch(write, staged, layout)
        except ValueError as problem:
            on_done(write, str(problem))
            return
        engine, target = self.engine.route(target)
        engine.learn(target, layout)
        if sum(batch[2]) <= engine.inline_bytes and not self._closing and write.room not in self._cancelled:
            on_done(write, self._engine_write(engine, target, batch, [write]))
            return
        pending = _Pending(write, batch, on_done)
        with self._target_lock:
            self._unfinished += 1
            running = self._target_running.get(target, 0)
            if running >= PEER_WRITES:
                # a write to it that ends takes this one, with the others waiting then
                self._target_queues.setdefault(target, (engine, deque()))[1].append(pending)
                return
            self._target_running[target] = running + 1
        self._pool.submit(self._run, engine, target, [pending])

    def _run(self, engine: WriteEngine, target: str, group: list[_Pending], chain: bool = True) -> None:
        """Write ``group`` (writes to one target) as one batch, then tell each how it went."""
        with self._target_lock:
            live = [pending for pending in group if not (self._closing or pending.write.room in self._cancelled)]
            self._writes_cancelled += len(group) - len(live)
            self._in_engine += len(live)
        errors: dict[int, str | None] = {id(pending): CANCELLED for pending in group}
        if live:
            try:
                started = time.monotonic()
                error = self._engine_write(engine, target, _merged([pending.batch for pending in live]),
                                           [pending.write for pending in live])
                errors.update((id(pending), error) for pending in live)
                if error is not None and len(live) > 1 and not isinstance(error, GivenUp):
                    # a quick failure (one broken lane, not a peer that does not answer) must
                    # not fail every round merged with it: each goes again on its own, while
                    # the merged call's time allows (a late write would outlast the rules'
                    # bound on it) and unless its room failed meanwhile
                    for pending in live:
                        if time.monotonic() - started >= SPLIT_AFTER_FAILURE:
                            break
                        with self._target_lock:
                            cancelled = self._closing or pending.write.room in self._cancelled
                            self._writes_cancelled += cancelled
                        errors[id(pending)] = CANCELLED if cancelled else self._engine_write(
                            engine, target, pending.batch, [pending.write])
            finally:
                with self._target_lock:
                    self._in_engine -= len(live)
                    self._idle.notify_all()
        raised: BaseException | None = None
        try:
            for pending in group:
                try:
                    pending.on_done(pending.write, errors[id(pending)])
                except BaseException as error:  # the others are still told
                    raised = raised or error
        finally:
            if chain:
                self._next_for(target)
            with self._target_lock:
                self._unfinished -= len(group)
                self._idle.notify_all()
        if raised is not None:
            raise raised

    @staticmethod
    def _engine_write(engine: WriteEngine, target: str, batch: tuple[list[int], list[int], list[int]],
                      writes: list[WriteRows]) -> str | None:
        """One batch (of ``writes``) through the engine: None when written, else why not."""
        try:
            rc = engine.write(target, *batch, note=note_for(writes)) if engine.notes else engine.write(target, *batch)
        except Exception as raised:  # the thread must survive anything the engine does
            return f"{engine.name} raised {type(raised).__name__}: {raised}"
        if rc == GIVEN_UP:
            return GivenUp(f"{engine.name} gave the write up unfinished (its bytes may still land)")
        return None if rc == 0 else f"{engine.name} returned {rc}"

    def _next_for(self, target: str) -> None:
        """A write to ``target`` ended: the writes waiting for it go now, as one batch (many
        small rooms to one peer cost one engine call, not one each)."""
        with self._target_lock:
            engine, waiting = self._target_queues.get(target, (self.engine, deque()))
            if not waiting:
                self._target_queues.pop(target, None)
                self._target_running[target] -= 1
                if not self._target_running[target]:
                    del self._target_running[target]
                return
            group: list[_Pending] = []
            entries = 0
            while waiting and (not group or entries + len(waiting[0].batch[0]) <= MERGED_ENTRIES):
                group.append(waiting.popleft())
                entries += len(group[-1].batch[0])
        try:
            self._pool.submit(self._run, engine, target, group)
        except RuntimeError:  # closing: the pool takes no new work, so finish it here
            self._run(engine, target, group)

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
            # (packed and copied in: a torch.tensor of 8 words costs more than the rest of a small round)
            ctypes.memmove(staged.aux.data_ptr(), _AUX_RECORD.pack(*write.aux.to_words()), _AUX_RECORD.size)
            local.append(staged.aux.data_ptr())
            remote.append(layout.aux_addr + write.aux_block * AUX_WORDS * 8)
            lengths.append(AUX_WORDS * 8)
        return local, remote, lengths

    def stats(self) -> dict[str, int]:
        with self._target_lock:
            counts = {"writes_in_engine": self._in_engine, "writes_cancelled": self._writes_cancelled,
                      "writes_queued": sum(len(waiting) for _, waiting in self._target_queues.values())}
        return {**counts, **self.engine.stats()}

    def close(self, grace: float | None = None) -> int:
        """Stop.  Every write not yet inside the engine ends at once as cancelled (its
        ``on_done`` is called, so the sender settles its room and sends what it owes); writes
        inside the engine get ``grace`` seconds (None: as long as they take).  Returns how many
        were still running then: abandoned, since the engine cannot interrupt them (the
        process should exit rather than wait); their staged rows are kept, as the engine may
        still read them."""
        with self._target_lock:
            self._closing = True
            queued = [(engine, target, list(waiting)) for target, (engine, waiting) in self._target_queues.items()]
            self._target_queues.clear()
        for engine, target, group in queued:  # behind a write that may never end: finish them here, as cancelled
            self._run(engine, target, group, chain=False)
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
        self.engine.prune(closing=True)
        return 0
