"""The fork's block allocator and buffers, backed by embxfer's registered pool.

The fork's scheduler builds ``ReqToMetadataBlockAllocator(size, block_size=)`` and
``MultimodalDataBuffers(size, block_size, embedding_dim)`` itself, then hands the buffers'
``get_buf_infos()`` to its transfer manager.  Here the buffers *are* the pool the data
plane writes into (token-slot tensors, one aux record a block), the allocator is the core's
``Allocator`` of that pool, and the manager finds both from the pointers it is given: one
pool, one allocator, shared by every encode server the process talks to.

On the language side the core must fence reuse of blocks a sender may still write, so a
``free`` of blocks the core holds (a round in flight, or quarantined after a failure) is
deferred until it lets go.  Also on the language side ``alloc`` hands out what is free, up
to what was asked (at least one block): a resume into fewer blocks than the rest needs is
one more round, which embxfer continues in those blocks by itself.  And a first allocation
(a request holding no blocks) leaves one block free while any request holds blocks, so a
request waiting for its resume always gets one: no deadlock in any pool of two blocks or more.
"""

from __future__ import annotations

import logging
import random
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from embxfer.core import Allocation, AllocatorError, AuxHeader, LocalProtocolError, ProtocolError, Settings
from embxfer.core import Allocator as CoreAllocator
from embxfer.transports.buffers import PoolBuffers

log = logging.getLogger("embxfer.sglang")

AUX_WORDS = 16  # the fork's aux row: [0] the room's total tokens, [1] its mrope position delta
RESUME_RESERVE = 1  # language side: blocks a first allocation leaves for resumes
APPLICATION = "application"  # the owner tag of blocks the engine allocated

# the pools of this process, by the pointer ``get_buf_infos`` reports first
_BUFFERS: "weakref.WeakValueDictionary[int, MultimodalDataBuffers]" = weakref.WeakValueDictionary()
# allocators not yet joined to their buffers (the fork builds the allocator first)
_UNJOINED: "list[weakref.ref[ReqToMetadataBlockAllocator]]" = []


def pool_settings(size: int, block_size: int, embedding_dim: int) -> Settings:
    """Settings of a fork-sized pool: the sizes the scheduler gave, the rest from the
    environment (``EMBXFER_*``; dtype bfloat16, the fork's, unless ``EMBXFER_DTYPE`` says)."""
    return Settings.from_env(block_size=block_size, pool_blocks=size, hidden_size=embedding_dim, default_blocks=1)


class ReqToMetadataBlockAllocator:
    """The fork's allocator: ``alloc`` returns a list of block ids or None; ``free`` takes
    them back.  ``partial`` (set by a language-side manager) lets ``alloc`` hand out fewer
    blocks than asked when that is all there is."""

    def __init__(self, size: int, block_size: int | None = None) -> None:
        if block_size is None:
            raise AllocatorError("block_size is required (the fork passes SGLANG_EMBEDDING_CACHE_BLOCK_SIZE)",
                                 field="block_size")
        self.total_blocks = size
        self.block_size = block_size
        self.core = CoreAllocator(Settings(block_size=block_size, pool_blocks=size, default_blocks=1))
        self.req_to_blocks: dict[Any, list[int]] = {}
        self.partial = False
        # set by the language-side manager: frees blocks unless the core still holds them
        self.release: Callable[[Allocation], None] = self.core.free
        self.on_free: list[Callable[[Allocation], None]] = []
        self.double_frees = 0
        self.lock: Any = threading.RLock()  # the manager's, once one takes this pool
        self._by_first_block: dict[int, Allocation] = {}
        _UNJOINED.append(weakref.ref(self))

    def available_size(self) -> int:
        """Free blocks."""
        with self.lock:
            return int(self.core.free_blocks)

    def alloc(self, num_tokens: int | None = None, req_id: Any = None, fake: bool = False) -> list[int] | None:
        with self.lock:
            return self._alloc(num_tokens, req_id, fake)

    def free(self, block_indices: Sequence[int] | None = None, req_id: Any = None, fake: bool = False) -> None:
        with self.lock:
            self._free(block_indices, req_id, fake)

    def _alloc(self, num_tokens: int | None, req_id: Any, fake: bool) -> list[int] | None:
        if fake:  # the fork's warm-up requests: a block id that is never written
            return [random.randrange(self.total_blocks)]
        wanted = 1 if num_tokens is None else -(-int(num_tokens) // self.block_size)
        if wanted < 1:
            raise AllocatorError(f"num_tokens must be positive, got {num_tokens}", field="num_tokens")
        if self.partial:
            free = self.core.free_blocks
            if req_id not in self.req_to_blocks and self._by_first_block:
                # a first allocation leaves one block for resumes while any request holds
                # blocks: with the fork's queues a pool filled by first allocations deadlocks
                # (each request waits, holding its blocks, for a resume allocation)
                free -= RESUME_RESERVE
            wanted = min(wanted, free)
        if wanted < 1 or wanted > self.core.free_blocks:
            return None
        allocation = self.core.alloc(wanted * self.block_size, owner=APPLICATION)
        if allocation is None:
            return None
        blocks = list(allocation.blocks())
        self._by_first_block[blocks[0]] = allocation
        if req_id is not None:
            self.req_to_blocks[req_id] = blocks
        return blocks

    def _free(self, block_indices: Sequence[int] | None, req_id: Any, fake: bool) -> None:
        if fake:
            return
        if block_indices is not None:
            blocks = [int(b) for b in block_indices]
            if req_id is not None and self.req_to_blocks.get(req_id) == blocks:
                del self.req_to_blocks[req_id]
        elif req_id is not None and req_id in self.req_to_blocks:
            blocks = self.req_to_blocks.pop(req_id)
        else:
            raise AllocatorError("either block_indices or req_id must be given", field="block_indices")
        if not blocks:
            return
        allocation = self._by_first_block.get(blocks[0])
        if allocation is None or list(allocation.blocks()) != blocks:
            # a second free of the same blocks (the fork can free after a re-prefill): harmless
            # here, since each allocation is freed once; counted, never applied twice
            self.double_frees += 1
            log.warning("free of blocks %s that are not one live allocation: ignored", blocks[:8])
            return
        del self._by_first_block[blocks[0]]
        for hook in self.on_free:
            hook(allocation)
        self.release(allocation)

    def free_with_req(self, req: Any) -> None:
        self.free(block_indices=req.embedding_indices, req_id=req.rid,
                  fake=getattr(req, "bootstrap_host", None) == "2.2.2.2")
        req.metadata_block_indices = None

    def allocation_of(self, block_indices: Sequence[int], field: str = "embedding_indices") -> Allocation:
        """The live allocation ``block_indices`` are, exactly (a typed error otherwise)."""
        blocks = [int(b) for b in block_indices] if block_indices is not None else []
        allocation = self._by_first_block.get(blocks[0]) if blocks else None
        if allocation is None or list(allocation.blocks()) != blocks:
            raise LocalProtocolError(f"{field} {blocks[:8]} are not blocks this allocator handed out", field=field)
        return allocation


class MultimodalDataBuffers:
    """The fork's buffers with its calls (``get_buf``, ``set_buf``, ``get_buf_infos``,
    ``aux_datas``), over embxfer's pool: token rows a slot, ``block_size`` slots a block."""

    def __init__(self, size: int, block_size: int, embedding_dim: int = 8192, num_deepstack_embeddings: int = 0) -> None:
        if num_deepstack_embeddings:
            raise LocalProtocolError("deepstack embeddings are not carried yet", field="num_deepstack_embeddings")
        self.total_blocks = size
        self.block_size = block_size
        self.embedding_dim = embedding_dim
        self.num_deepstack_embeddings = 0
        self.settings = pool_settings(size, block_size, embedding_dim)
        self.pool = PoolBuffers(self.settings)
        self.aux_datas = torch.zeros(size, AUX_WORDS, dtype=torch.int64)
        # rows of earlier rounds embxfer continued in the same blocks, by first block
        self.stashes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.allocator = self._join_allocator()
        self.allocator.on_free.append(self._forget_blocks)
        _BUFFERS[self.pool.embeddings.data_ptr()] = self

    @property
    def input_embeddings(self) -> torch.Tensor:
        return self.pool.embeddings.view(self.total_blocks, self.block_size * self.embedding_dim)

    def get_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """``(pointers, byte lengths, bytes per block)`` of each buffer, as the fork's."""
        buffers = (self.pool.embeddings, self.pool.fill_ids, self.pool.mrope, self.aux_datas)
        ptrs = [b.data_ptr() for b in buffers]
        lens = [b.nbytes for b in buffers]
        return ptrs, lens, [n // self.total_blocks for n in lens]

    def get_buf(self, block_indices: Sequence[int] | None = None, actual_total_length: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        """``(embeddings (L, D), fill_ids (L,), mrope_positions (3, L), aux row, None)`` of
        the first L tokens the blocks hold, in block order (L: ``actual_total_length``, or
        the aux row's total), rows embxfer continued in these blocks first."""
        if block_indices is None or len(block_indices) == 0:
            raise LocalProtocolError("block_indices must name at least one block", field="block_indices")
        blocks = [int(b) for b in block_indices]
        self._refresh_aux(blocks[0])
        aux = self.aux_datas[blocks[0]]
        total = int(actual_total_length) if actual_total_length is not None else int(aux[0])
        embeddings, fill_ids, mrope = self.read_rows(blocks, total)
        return embeddings, fill_ids.to(torch.int32), mrope.t().to(torch.int32), aux, None

    def read_rows(self, blocks: list[int], total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeddings, fill_ids, mrope (L, 3))`` of the first ``total`` tokens, in the
        pool's own dtypes: the stash of earlier rounds first, then the blocks in order."""
        stash = self.stashes.get(blocks[0])
        before = stash[0].shape[0] if stash is not None else 0
        wanted = max(0, min(total - before, len(blocks) * self.block_size))
        slots = _slots(blocks, self.block_size, wanted)
        embeddings, fill_ids, mrope = self.pool.embeddings[slots], self.pool.fill_ids[slots], self.pool.mrope[slots]
        if stash is not None:
            embeddings = torch.cat([stash[0], embeddings])
            fill_ids = torch.cat([stash[1], fill_ids])
            mrope = torch.cat([stash[2], mrope])
        return embeddings, fill_ids, mrope

    def set_buf(self, req: Any) -> None:
        """Encode side: the request's embedding, fill ids, mrope positions and aux into its
        blocks (``req.embedding_indices``), as the fork lays them out."""
        embedding = req.embedding
        blocks = [int(b) for b in req.embedding_indices]
        length = int(embedding.shape[0])
        capacity = len(blocks) * self.block_size
        if length > capacity:
            log.warning("room %s: %d embedding rows do not fit %d blocks; the rest is cut (as the fork does)",
                        getattr(req, "bootstrap_room", "?"), length, len(blocks))
        count = min(length, capacity)
        slots = _slots(blocks, self.block_size, count)
        self.pool.embeddings[slots] = embedding[:count].to(self.pool.embeddings.dtype)
        self.pool.fill_ids[slots] = torch.as_tensor(list(req.fill_ids[:count]), dtype=torch.int64)
        mm = getattr(req, "multimodal_inputs", None)
        mrope = getattr(mm, "mrope_positions", None) if mm is not None else None
        if mrope is not None:
            self.pool.mrope[slots] = mrope[:, :count].t().to(torch.int64)
        self.aux_datas[blocks[0]][0] = length
        delta = getattr(mm, "mrope_position_delta", None) if mm is not None else None
        if delta is not None:
            self.aux_datas[blocks[0]][1] = int(delta.reshape(-1)[0])

    def rows_of(self, blocks: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Encode side: ``(embeddings, fill_ids, mrope (3, n), mrope delta)`` of a request's blocks."""
        slots = _slots([int(b) for b in blocks], self.block_size, num_tokens)
        return (self.pool.embeddings[slots], self.pool.fill_ids[slots], self.pool.mrope[slots].t().contiguous(),
                int(self.aux_datas[int(blocks[0])][1]))

    # -- inside ------------------------------------------------------------------------
    def _refresh_aux(self, block: int) -> None:
        """Language side: the fork's aux row from the header round 0 landed with."""
        if not int(self.pool.aux[block].abs().sum()):
            return
        try:
            header = AuxHeader.from_words(self.pool.aux[block].tolist())
        except ProtocolError:
            return
        self.aux_datas[block][0] = header.total_tokens
        self.aux_datas[block][1] = header.mrope_position_delta

    def _forget_blocks(self, allocation: Allocation) -> None:
        """The engine freed these blocks: nothing of their last room may show through."""
        first = next(allocation.blocks())
        self.stashes.pop(first, None)
        self.pool.clear_aux(first)

    def _join_allocator(self) -> ReqToMetadataBlockAllocator:
        for ref in reversed(_UNJOINED):
            allocator = ref()
            if allocator is not None and allocator.total_blocks == self.total_blocks \
                    and allocator.block_size == self.block_size:
                _UNJOINED.remove(ref)
                _UNJOINED[:] = [r for r in _UNJOINED if r() is not None]
                return allocator
        # no allocator built first (not the fork's order): one of our own
        allocator = ReqToMetadataBlockAllocator(self.total_blocks, block_size=self.block_size)
        _UNJOINED.pop()
        return allocator


def buffers_for(kv_args: Any) -> MultimodalDataBuffers:
    """The pool a manager was handed (``kv_args.aux_data_ptrs`` from ``get_buf_infos``)."""
    pointers = getattr(kv_args, "aux_data_ptrs", None) or []
    buffers = _BUFFERS.get(pointers[0]) if pointers else None
    if buffers is None:
        raise LocalProtocolError(
            "kv_args.aux_data_ptrs do not name an embxfer MultimodalDataBuffers "
            "(build the buffers with embxfer.adapters.sglang.MultimodalDataBuffers)", field="aux_data_ptrs")
    return buffers


def _slots(blocks: list[int], block_size: int, num_tokens: int) -> torch.Tensor:
    """Pool slots of the first ``num_tokens`` tokens laid across ``blocks`` in order."""
    full, rest = divmod(num_tokens, block_size)
    base = torch.as_tensor(blocks[:full + (1 if rest else 0)], dtype=torch.int64) * block_size
    slots = (base[:, None] + torch.arange(block_size)[None, :]).reshape(-1)
    return slots[:num_tokens]
