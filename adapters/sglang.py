"""An SGLang-shaped facade: the fork's class and method names over embxfer's endpoints.

The fork's scheduler queues create one sender/receiver object per request ("room") and
call ``init`` / ``send_embedding`` / ``resume_transfer`` / ``poll`` /
``failure_exception``.  Here those objects wrap any embxfer facade (``EncodeServer`` /
``LanguageClient`` on real wires, or the loopback handles in tests):

* ``EmbeddingReceiver.init(allocation)``: embxfer allocates from its own registered pool
  (it must know the blocks to keep them safe from reuse while a write may land), so the
  fork's allocation argument is accepted for compatibility and not used.
* ``resume_transfer(allocation, sent_tokens)``: embxfer resumes by itself as soon as blocks
  are free; the call only checks ``sent_tokens`` against what has arrived and returns.
* ``poll()`` returns ``Poll`` (== SGLang's ``KVPoll`` integers).
"""

from __future__ import annotations

from typing import Any

import torch

from embxfer.core import Poll, ProtocolError
from embxfer.transports.buffers import EmbeddingData


class TransferFailed(ProtocolError):
    """The room ended in Failed; the message is its reason."""


class EmbeddingSender:
    def __init__(self, manager: Any, bootstrap_room: int) -> None:
        self.manager = manager
        self.bootstrap_room = bootstrap_room

    def init(self, num_tokens: int | None = None) -> None:
        """Nothing to reserve: the room opens when its first init or its data arrives."""

    def send_embedding(self, embeddings: torch.Tensor, fill_ids: torch.Tensor, mrope_positions: torch.Tensor,
                       mrope_position_delta: int = 0) -> None:
        self.manager.send(self.bootstrap_room, EmbeddingData(embeddings, fill_ids, mrope_positions, int(mrope_position_delta)))

    def poll(self) -> Poll:
        return self.manager.poll(self.bootstrap_room)  # type: ignore[no-any-return]

    def failure_exception(self) -> None:
        raise TransferFailed(self.manager.failure(self.bootstrap_room) or f"room {self.bootstrap_room} failed")

    def abort(self) -> None:
        self.manager.abort(self.bootstrap_room)

    def clear(self) -> None:
        """Forget the finished room (after its failure was read); see README "Retention"."""
        self.manager.clear(self.bootstrap_room)


class EmbeddingReceiver:
    def __init__(self, manager: Any, bootstrap_room: int) -> None:
        self.manager = manager
        self.bootstrap_room = bootstrap_room

    def init(self, allocation: Any = None, allocated_tokens: int | None = None) -> None:
        self.manager.init(self.bootstrap_room)

    def resume_transfer(self, allocation: Any = None, sent_tokens: int | None = None,
                        allocated_tokens: int | None = None) -> None:
        received = self.manager.endpoint.sent_tokens(self.bootstrap_room)
        if sent_tokens is not None and sent_tokens > received:
            raise ProtocolError(
                f"resume_transfer: sent_tokens {sent_tokens} is past the {received} tokens received",
                field="sent_tokens",
            )

    def poll(self) -> Poll:
        return self.manager.poll(self.bootstrap_room)  # type: ignore[no-any-return]

    def failure_exception(self) -> None:
        raise TransferFailed(self.manager.failure(self.bootstrap_room) or f"room {self.bootstrap_room} failed")

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(embeddings, fill_ids, mrope_positions, mrope_position_delta), exactly as sent."""
        data = self.manager.take(self.bootstrap_room)
        return data.embeddings, data.fill_ids, data.mrope_positions, data.mrope_position_delta

    def abort(self) -> None:
        self.manager.abort(self.bootstrap_room)

    def clear(self) -> None:
        """Forget the finished room (after its failure was read); see README "Retention"."""
        self.manager.clear(self.bootstrap_room)
