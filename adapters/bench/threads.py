"""torch's intra-op thread count, pinned for a measurement and restored after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """On a busy 2-core machine a copy spread over torch's thread pool can wait on a
    descheduled worker for milliseconds: a memcpy is one thread, and so is a loop of tiny copies."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
