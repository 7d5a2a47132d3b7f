"""The fork's per-request objects, with its constructors and calls, over embxfer's endpoints.

Poll values follow the fork's meaning at each of its queues while the core keeps its own
states:

* a sender before any receiver reached it is ``Bootstrapping`` (the core has no room yet);
  ``WaitingForInput`` once every destination's init arrived (the fork then allocates,
  inits and runs the forward); then ``Transferring``/``Success``/``Failed``;
* a receiver before its ``init`` is ``Bootstrapping`` until its encode server answered,
  then ``WaitingForInput`` ("bootstrapped, ready for init": the only way out of the fork's
  prealloc queue).  After ``init`` it stays ``WaitingForInput`` until a round lands;
  ``Transferring`` when a partial round awaits the scheduler's ``resume_transfer``.

An outcome is latched the first time a poll sees it and the core forgets the room then
(the fork never clears a language-side receiver): the record goes, the answer stays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from embxfer.core import LocalProtocolError, Poll, ProtocolError, check_room
from embxfer.specs.tables import TRANSFERRING
from embxfer.transports.buffers import EmbeddingData

# the fork's ``KVPoll`` is a plain class of ints; ``Poll`` is an IntEnum of the same values
KVPoll = Poll


OTHER_RANK = "failed on another rank of this server (its all-reduced poll said Failed)"


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """Under the manager's lock: the scheduler's thread and the I/O threads share the pool."""
    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.mgr.lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class TransferFailed(ProtocolError):
    """The room ended in Failed; the message is its reason."""


class _Request:
    def __init__(self, mgr: Any, bootstrap_room: Any) -> None:
        self.mgr = mgr
        self.bootstrap_room = check_room(bootstrap_room)
        self._outcome: tuple[Poll, str] | None = None  # latched Success/Failed and the reason

    @_locked
    def failure_exception(self) -> None:
        """Raise the reason the room failed (and let the room go, as the fork does).  Asked
        of a room that has not failed here, the scheduler's all-reduced poll said Failed
        for another rank: the room is given up here too, so its blocks and peers are told."""
        if self.poll() != Poll.Failed:
            self.abort(OTHER_RANK)
            if self._outcome is None or self._outcome[0] != Poll.Failed:
                self._latch(Poll.Failed, OTHER_RANK)
        assert self._outcome is not None
        self.clear()
        raise TransferFailed(self._outcome[1] or f"room {self.bootstrap_room} failed for an unknown reason")

    def abort(self, reason: str = "") -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def poll(self) -> Poll:
        raise NotImplementedError

    def _latch(self, poll: Poll, reason: str) -> Poll:
        self._outcome = (poll, reason)
        return poll


class EmbeddingSender(_Request):
    """Encode side, one per request: ``EmbeddingSender(mgr, bootstrap_addr, bootstrap_room,
    dest_tp_ranks, pp_rank)``."""

    def __init__(self, mgr: Any, bootstrap_addr: str, bootstrap_room: int, dest_tp_ranks: Any = None,
                 pp_rank: int = 0) -> None:
        super().__init__(mgr, bootstrap_room)
        self.bootstrap_addr = bootstrap_addr
        self.dest_tp_ranks = dest_tp_ranks
        self.pp_rank = pp_rank
        self.embedding_indices: list[int] | None = None
        self.link = mgr.sender_link()
        self.created = mgr.now()

    @_locked
    def init(self, embedding_indices: Any = None, **_: Any) -> None:
        """The blocks the engine allocated for this request's rows (``set_buf`` fills them)."""
        self.embedding_indices = [int(b) for b in embedding_indices] if embedding_indices is not None else None

    @_locked
    def send_embedding(self, embedding_indices: Any = None, last_chunk: bool = True, total_tokens: int | None = None,
                       block_size: int | None = None) -> None:
        """Send the rows ``set_buf`` put in ``embedding_indices``: ``total_tokens`` of them."""
        buffers = self.mgr.buffers
        blocks = [int(b) for b in (embedding_indices if embedding_indices is not None else self.embedding_indices or [])]
        if not last_chunk:
            raise LocalProtocolError("only the last chunk is sent (as in the fork)", field="last_chunk")
        if block_size is not None and int(block_size) != buffers.block_size:
            raise LocalProtocolError(f"block_size {block_size}, but the pool's is {buffers.block_size}", field="block_size")
        if not blocks:
            raise LocalProtocolError("no embedding_indices to send from", field="embedding_indices")
        total = int(total_tokens) if total_tokens is not None else int(buffers.aux_datas[blocks[0]][0])
        if not 0 < total <= len(blocks) * buffers.block_size:
            # the rows are not all there: fail this room (both sides learn why), not the engine
            self.link.abort(self.bootstrap_room, f"total_tokens {total} do not fit {len(blocks)} blocks")
            return
        embeddings, fill_ids, mrope, delta = buffers.rows_of(blocks, total)
        self.link.send(self.bootstrap_room, EmbeddingData(embeddings, fill_ids, mrope, delta))

    def send(self, *_: Any, **__: Any) -> None:
        """The fork's KV ``send``: nothing for embeddings."""

    @_locked
    def poll(self) -> Poll:
        if self._outcome is not None:
            return self._outcome[0]
        endpoint = self.link.endpoint
        state = endpoint.state_of(self.bootstrap_room)
        if state is None:
            early = endpoint.early_abort(self.bootstrap_room)
            if early is not None:  # a receiver gave it up before its init
                return self._latch(Poll.Failed, early)
            if self.mgr.now() - self.created > self.mgr.settings.bootstrap_timeout:
                self.abort(f"no language server asked for room {self.bootstrap_room} within bootstrap_timeout")
                return Poll.Failed
            return Poll.Bootstrapping  # no receiver has reached us yet
        poll = Poll[state]
        if poll in (Poll.Success, Poll.Failed):
            return self._latch(poll, endpoint.failure(self.bootstrap_room))
        return poll

    @_locked
    def abort(self, reason: str = "") -> None:
        if self._outcome is not None:
            return
        reason = reason or "aborted by the encode scheduler"
        self.link.abort(self.bootstrap_room, reason)
        if self.link.endpoint.state_of(self.bootstrap_room) is None:
            # no receiver had reached us: the core keeps the abort for its init; here it is final
            self._latch(Poll.Failed, reason)
        else:
            self.poll()

    @_locked
    def clear(self) -> None:
        """Let the finished room go (the fork calls it after Success and in failure_exception)."""
        self.link.forget_if_finished(self.bootstrap_room)


class EmbeddingReceiver(_Request):
    """Language side, one per request: ``EmbeddingReceiver(mgr, bootstrap_addr,
    bootstrap_room, prefill_dp_rank)``; ``bootstrap_addr`` names the encode server the
    router picked for this request."""

    def __init__(self, mgr: Any, bootstrap_addr: str, bootstrap_room: int | None = None,
                 prefill_dp_rank: int | None = None) -> None:
        super().__init__(mgr, bootstrap_room)
        self.bootstrap_addr = bootstrap_addr
        self.prefill_dp_rank = prefill_dp_rank
        self.created = mgr.now()
        self.inited = False
        self._scheduler_resumed = False
        self._blocks: list[int] = []
        try:
            self.link = mgr.language_link(bootstrap_addr)
        except (ConnectionError, ProtocolError) as error:
            self.link = None
            self._latch(Poll.Failed, f"no encode server at {bootstrap_addr}: {error}")

    @_locked
    def init(self, embedding_indices: Any = None, allocated_tokens: int | None = None, **_: Any) -> None:
        """Round 0 into the engine's blocks (``alloc`` of this manager's allocator)."""
        if self._outcome is not None or self.link is None:
            return  # failed already (aborted, or no encode server): the poll says so
        allocation = self.mgr.allocator.allocation_of(embedding_indices)
        if allocated_tokens is not None and int(allocated_tokens) != allocation.capacity_tokens:
            raise LocalProtocolError(
                f"allocated_tokens {allocated_tokens}, but {len(self._blocks_of(allocation))} blocks hold "
                f"{allocation.capacity_tokens}", field="allocated_tokens")
        self._blocks = self._blocks_of(allocation)
        self.inited = True
        self.link.init(self.bootstrap_room, allocation)

    @_locked
    def resume_transfer(self, embedding_indices: Any = None, sent_tokens: int | None = None,
                        allocated_tokens: int | None = None) -> None:
        """The next round into new blocks, after the engine read and freed the last ones."""
        if self._outcome is not None or self.link is None:
            return
        allocation = self.mgr.allocator.allocation_of(embedding_indices)
        if allocated_tokens is not None and int(allocated_tokens) != allocation.capacity_tokens:
            raise LocalProtocolError(
                f"allocated_tokens {allocated_tokens}, but the blocks hold {allocation.capacity_tokens}",
                field="allocated_tokens")
        sent = int(sent_tokens) if sent_tokens is not None else self.link.endpoint.sent_tokens(self.bootstrap_room)
        self.link.resume(self.bootstrap_room, allocation, sent)
        self._blocks = self._blocks_of(allocation)
        self._scheduler_resumed = True

    @_locked
    def poll(self) -> Poll:
        if self._outcome is not None:
            return self._outcome[0]
        if self.link is None:
            return Poll.Failed
        if not self.inited:
            return self._poll_before_init()
        endpoint = self.link.endpoint
        room = self.bootstrap_room
        state = endpoint.state_of(room)
        if state is None:
            return self._latch(Poll.Failed, "the room was forgotten before its outcome was read")
        poll = Poll[state]
        if poll in (Poll.Success, Poll.Failed):
            reason = endpoint.failure(room)
            self.link.forget_if_finished(room)
            return self._latch(poll, reason)
        if state == TRANSFERRING and endpoint.allocation_of(room) is None:
            if self._scheduler_resumed and self.mgr.continue_rounds:
                self._continue_in_place()  # the fork resumes once; later rounds are ours
            return Poll.Transferring
        # a round in flight: the fork reads Transferring only when it can resume
        return Poll.Transferring if self._scheduler_resumed and self.mgr.continue_rounds else Poll.WaitingForInput

    @_locked
    def abort(self, reason: str = "") -> None:
        if self._outcome is not None:
            return
        reason = reason or "aborted by the language scheduler"
        if self.inited and self.link is not None:
            self.link.abort(self.bootstrap_room, reason)
            self.poll()
        else:
            if self.link is not None and self.bootstrap_room is not None:
                self.link.cancel(self.bootstrap_room, reason)  # its encode server lets the request go too
            self._latch(Poll.Failed, f"{reason} (before init)")

    @_locked
    def clear(self) -> None:
        if self.inited and self.link is not None:
            self.link.forget_if_finished(self.bootstrap_room)

    # -- inside ------------------------------------------------------------------------
    def _poll_before_init(self) -> Poll:
        assert self.link is not None
        refusal = self.link.endpoint.refusal
        if refusal is not None:
            return self._latch(Poll.Failed, f"the encode server at {self.bootstrap_addr} refused: {refusal}")
        waited = self.mgr.now() - self.created
        if not self.link.endpoint.peer_ready:
            if waited > self.mgr.settings.bootstrap_timeout:
                return self._latch(Poll.Failed, f"no encode server answered at {self.bootstrap_addr} "
                                                f"within {self.mgr.settings.bootstrap_timeout:g} s")
            return Poll.Bootstrapping
        if waited > self.mgr.settings.admission_timeout:
            return self._latch(Poll.Failed, f"no blocks for {waited:.1f} s (admission_timeout)")
        return Poll.WaitingForInput

    def _continue_in_place(self) -> None:
        """A later round of a room the scheduler resumed once: move the rows that landed
        into the blocks' stash (``get_buf`` returns them first) and ask for the next round
        in the same blocks."""
        assert self.link is not None
        buffers = self.mgr.buffers
        first = self._blocks[0]
        landed = self.link.rows.landed.get(self.mgr.allocator.allocation_of(self._blocks).id)
        if landed is None:
            return
        buffers.stashes[first] = buffers.read_rows(self._blocks, landed.num_tokens + _stashed(buffers, first))
        allocation = self.mgr.allocator.allocation_of(self._blocks)
        self.link.resume(self.bootstrap_room, allocation, self.link.endpoint.sent_tokens(self.bootstrap_room))

    @staticmethod
    def _blocks_of(allocation: Any) -> list[int]:
        return list(allocation.blocks())


def _stashed(buffers: Any, first: int) -> int:
    stash = buffers.stashes.get(first)
    return int(stash[0].shape[0]) if stash is not None else 0
