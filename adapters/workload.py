"""Deterministic synthetic rooms: the same (seed, room) always gives the same rows.

Lengths are chosen to need no resume, one resume and several resumes under the given
settings, so a demo or test covers every path.  Both sides of a link can regenerate a
room's rows independently to verify them.
"""

from __future__ import annotations

import random

import torch

from embxfer.core import Settings
from embxfer.transports.buffers import EmbeddingData, torch_dtype


def room_length(seed: int, room: int, settings: Settings) -> int:
    """Cycle through: fits the default guess, needs one resume, needs several."""
    rng = random.Random(seed * 1_000_003 + room)
    default = settings.default_tokens
    kind = room % 3
    if kind == 0:
        return rng.randint(1, default)
    if kind == 1:
        return rng.randint(default + 1, 2 * default)
    return rng.randint(3 * default + 1, max(3 * default + 2, 2 * settings.pool_tokens))


def room_data(seed: int, room: int, settings: Settings, num_tokens: int | None = None) -> EmbeddingData:
    n = room_length(seed, room, settings) if num_tokens is None else num_tokens
    generator = torch.Generator().manual_seed(seed * 7_919 + room)
    embeddings = torch.randn(n, settings.hidden_size, generator=generator).to(torch_dtype(settings.dtype))
    fill_ids = torch.randint(0, 1 << 40, (n,), generator=generator, dtype=torch.int64)
    mrope = torch.randint(-(1 << 20), 1 << 20, (3, n), generator=generator, dtype=torch.int64)
    delta = random.Random(seed + room).randint(-(1 << 30), 1 << 30)
    return EmbeddingData(embeddings, fill_ids, mrope, delta)

