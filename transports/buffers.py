"""Torch buffers: the receiver's block pool and the embedding data it carries.

Layout (one row per token slot, so a run of slots is one contiguous copy):
``embeddings [slots, hidden]`` of the pool dtype, ``fill_ids [slots]`` int64,
``mrope [slots, 3]`` int64 (token-major; callers' ``[3, n]`` is transposed once), and
``aux [pool_blocks, AUX_WORDS]`` int64, one aux record per block.

The pool and the results assembled from it live on ``settings.device``; every copy is a
torch copy, so they run on any device.  A pool in host memory is pinned (page-locked) where
this torch can pin, i.e. where it sees a CUDA device (copies to and from the device then run
at full speed, and RDMA engines register it without faulting pages); elsewhere, or where pinning
is refused, it is ordinary memory (``PoolBuffers.pinned`` says which).  (torch's pinned
allocator rounds a buffer up to a power of two of page-locked memory.)
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import torch

from embxfer.core import AuxHeader, LocalProtocolError, Settings
from embxfer.specs.schemas import AUX_WORDS

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _tensor(kind: str):  # type: ignore[no-untyped-def]
    def check(instance, attribute, value):  # type: ignore[no-untyped-def]
        if not isinstance(value, torch.Tensor):
            raise LocalProtocolError(f"{attribute.name} must be a torch.Tensor, got {type(value).__name__}", field=attribute.name)

    return check


@attrs.frozen(eq=False)
class EmbeddingData:
    """One room's rows: ``embeddings [n, hidden]``, ``fill_ids [n]`` int64,
    ``mrope_positions [3, n]`` int64 and the scalar ``mrope_position_delta``."""

    embeddings: torch.Tensor = attrs.field(validator=_tensor("embeddings"))
    fill_ids: torch.Tensor = attrs.field(validator=_tensor("fill_ids"))
    mrope_positions: torch.Tensor = attrs.field(validator=_tensor("mrope_positions"))
    mrope_position_delta: int = 0

    def __attrs_post_init__(self) -> None:
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] < 1:
            raise LocalProtocolError(f"embeddings must be [n >= 1, hidden], got {list(self.embeddings.shape)}", field="embeddings")
        n = self.embeddings.shape[0]
        if self.embeddings.dtype not in _DTYPES.values():
            raise LocalProtocolError(f"embeddings dtype {self.embeddings.dtype} is not float32, float16 or bfloat16", field="embeddings")
        if self.fill_ids.shape != (n,) or self.fill_ids.dtype != torch.int64:
            raise LocalProtocolError(f"fill_ids must be int64 [{n}], got {self.fill_ids.dtype} {list(self.fill_ids.shape)}", field="fill_ids")
        if self.mrope_positions.shape != (3, n) or self.mrope_positions.dtype != torch.int64:
            raise LocalProtocolError(
                f"mrope_positions must be int64 [3, {n}], got {self.mrope_positions.dtype} {list(self.mrope_positions.shape)}",
                field="mrope_positions",
            )
        if not isinstance(self.mrope_position_delta, int) or isinstance(self.mrope_position_delta, bool):
            raise LocalProtocolError("mrope_position_delta must be an int", field="mrope_position_delta")

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    def copy(self) -> "EmbeddingData":
        """The same rows in dense memory of their own (e.g. out of a lease on the pool)."""
        dense = torch.contiguous_format
        return EmbeddingData(self.embeddings.clone(memory_format=dense), self.fill_ids.clone(memory_format=dense),
                             self.mrope_positions.clone(memory_format=dense), self.mrope_position_delta)

    def check_fits(self, settings: Settings) -> None:
        if self.embeddings.shape[1] != settings.hidden_size:
            raise LocalProtocolError(
                f"embeddings hidden size {self.embeddings.shape[1]} != settings.hidden_size {settings.hidden_size}",
                field="embeddings",
            )
        if self.embeddings.dtype != torch_dtype(settings.dtype):
            raise LocalProtocolError(f"embeddings dtype {self.embeddings.dtype} != settings.dtype {settings.dtype}", field="embeddings")

    def same_bytes(self, other: "EmbeddingData") -> bool:
        """Exact equality, bit for bit (NaN payloads included)."""
        return (
            self.mrope_position_delta == other.mrope_position_delta
            and _same_bytes(self.embeddings, other.embeddings)
            and _same_bytes(self.fill_ids, other.fill_ids)
            and _same_bytes(self.mrope_positions, other.mrope_positions)
        )


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(_bytes_of(a), _bytes_of(b))


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    # a fresh dense copy: .contiguous() may keep odd strides on size-1 dims, which view() rejects
    dense = torch.empty(tensor.shape, dtype=tensor.dtype)
    dense.copy_(tensor)
    return dense.reshape(-1).view(torch.uint8)


class SourceRows:
    """A sender's rows staged for writing: mrope transposed to token-major once."""

    __slots__ = ("embeddings", "fill_ids", "mrope", "num_tokens")

    def __init__(self, data: EmbeddingData) -> None:
        self.embeddings = data.embeddings.contiguous()
        self.fill_ids = data.fill_ids.contiguous()
        self.mrope = data.mrope_positions.t().contiguous()
        self.num_tokens = data.num_tokens

    def on_host(self) -> "SourceRows":
        """These rows in host memory: themselves, or a copy of rows on a device (made once,
        for a data plane that reads host memory only)."""
        if self.embeddings.device.type == "cpu":
            return self
        copy = object.__new__(SourceRows)
        copy.embeddings, copy.fill_ids, copy.mrope = self.embeddings.cpu(), self.fill_ids.cpu(), self.mrope.cpu()
        copy.num_tokens = self.num_tokens
        return copy


def can_pin() -> bool:
    """Whether this torch can pin host memory (it needs an accelerator to pin for)."""
    return bool(torch.cuda.is_available())


def pool_device(settings: Settings) -> torch.device:
    """``settings.device`` as a torch device with its index (a bare ``cuda`` is the current
    one, resolved once: the I/O thread's current device may differ); a clear error where
    this torch has no such device."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LocalProtocolError(f"device {settings.device!r}: this torch sees no CUDA device "
                                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})", field="device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise LocalProtocolError(f"device {settings.device!r}: this host has {torch.cuda.device_count()} CUDA "
                                 f"device(s)", field="device")
    return device


def settle(device: torch.device) -> None:
    """Wait for the copies queued on ``device`` (a no-op in host memory).  Before blocks go
    back to the pool, and before a data plane reads rows: a remote writer (NIXL, Mooncake)
    writes device memory outside CUDA's streams, so a queued copy out of reused blocks, or
    a queued kernel still making the rows, would race it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PoolBuffers:
    """The receiver's pool: token-slot buffers cut into blocks, plus one aux record a block."""

    def __init__(self, settings: Settings) -> None:
        slots = settings.pool_tokens
        self.block_size = settings.block_size
        self.device = pool_device(settings)
        self.pinned = self.device.type == "cpu" and can_pin()
        try:
            self._allocate(settings, slots)
        except RuntimeError:  # page-locked memory refused (a limit, a pool too large to pin)
            if not self.pinned:
                raise
            self.pinned = False
            self._allocate(settings, slots)

    def _allocate(self, settings: Settings, slots: int) -> None:
        device, pinned = self.device, self.pinned
        self.embeddings = torch.zeros(slots, settings.hidden_size, dtype=torch_dtype(settings.dtype), device=device,
                                      pin_memory=pinned)
        self.fill_ids = torch.zeros(slots, dtype=torch.int64, device=device, pin_memory=pinned)
        self.mrope = torch.zeros(slots, 3, dtype=torch.int64, device=device, pin_memory=pinned)
        self.aux = torch.zeros(settings.pool_blocks, AUX_WORDS, dtype=torch.int64, device=device, pin_memory=pinned)

    def write(self, source: SourceRows, sent_tokens: int, runs: Iterable[tuple[int, int, int]]) -> None:
        """Copy source tokens into slots: one copy per run and buffer kind."""
        for first_slot, token_offset, length in runs:
            src = sent_tokens + token_offset
            self.embeddings[first_slot:first_slot + length].copy_(source.embeddings[src:src + length])
            self.fill_ids[first_slot:first_slot + length].copy_(source.fill_ids[src:src + length])
            self.mrope[first_slot:first_slot + length].copy_(source.mrope[src:src + length])

    def rows_view(self, first_slot: int, num_tokens: int, aux: AuxHeader) -> EmbeddingData:
        """A room's rows where they lie in one run of slots: views of the pool, no copy (mrope
        as the transposed view of its token-major slots)."""
        end = first_slot + num_tokens
        return EmbeddingData(self.embeddings[first_slot:end], self.fill_ids[first_slot:end],
                             self.mrope[first_slot:end].t(), aux.mrope_position_delta)

    def write_aux(self, block: int, header: AuxHeader) -> None:
        self.aux[block] = torch.tensor(header.to_words(), dtype=torch.int64)

    def read_aux(self, block: int) -> AuxHeader:
        return AuxHeader.from_words(self.aux[block].tolist())

    def clear_aux(self, block: int) -> None:
        self.aux[block].zero_()
        settle(self.device)  # (the block may be handed out, and written, as soon as we return)


class Assembly:
    """Where a room's rows go when they leave the pool, round by round."""

    __slots__ = ("embeddings", "fill_ids", "mrope", "delta", "storage")

    def __init__(self, header: AuxHeader, settings: Settings, spare: torch.Tensor | None = None,
                 device: torch.device | None = None) -> None:
        """``spare``: embedding rows of a result nobody reads any more, at least this room's
        length: reused (their pages are already faulted in), else fresh memory.  ``device``:
        the pool's (results live where the pool does; default: ``settings.device``)."""
        total = header.total_tokens
        device = device if device is not None else pool_device(settings)
        if spare is None or spare.shape[0] < total:
            spare = torch.empty(total, settings.hidden_size, dtype=torch_dtype(settings.dtype), device=device)
        self.storage = spare  # (what the result's embeddings are a view of)
        self.embeddings = spare[:total]
        self.fill_ids = torch.empty(total, dtype=torch.int64, device=device)
        self.mrope = torch.empty(total, 3, dtype=torch.int64, device=device)
        self.delta = header.mrope_position_delta

    def collect(self, pool: PoolBuffers, runs: Iterable[tuple[int, int, int]], sent_tokens: int) -> None:
        for first_slot, token_offset, length in runs:
            dst = sent_tokens + token_offset
            self.embeddings[dst:dst + length].copy_(pool.embeddings[first_slot:first_slot + length])
            self.fill_ids[dst:dst + length].copy_(pool.fill_ids[first_slot:first_slot + length])
            self.mrope[dst:dst + length].copy_(pool.mrope[first_slot:first_slot + length])
        settle(pool.device)  # copied out before the core hands these blocks on

    def result(self) -> EmbeddingData:
        return EmbeddingData(self.embeddings, self.fill_ids, self.mrope.t().contiguous(), self.delta)
