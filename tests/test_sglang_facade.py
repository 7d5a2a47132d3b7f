"""The fork-shaped facade's edges: typed errors for bad calls, frees the core defers, the
scheduler resuming every round itself, admission and bootstrap limits."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from embxfer.adapters.sglang import (
    EmbeddingReceiver, EmbeddingSender, ForkLoopback, KVPoll, LoopbackEmbeddingManager, MultimodalDataBuffers,
    ReqToMetadataBlockAllocator, TransferFailed,
)
from embxfer.core import LocalProtocolError

BLOCK, HIDDEN, ADDR = 4, 8, "10.0.0.1:8998"


class Pair:
    """One encode and one language manager on a loopback, built as the fork builds them."""

    def __init__(self, language_blocks: int = 8, encode_blocks: int = 64, **server: Any) -> None:
        self.world = ForkLoopback()
        self.encode = self._manager("encode", encode_blocks, "10.0.0.1", server)
        self.language = self._manager("language", language_blocks, "10.9.9.9", server)

    def _manager(self, mode: str, blocks: int, host: str, server: dict[str, Any]) -> LoopbackEmbeddingManager:
        ReqToMetadataBlockAllocator(blocks, block_size=BLOCK)
        buffers = MultimodalDataBuffers(blocks, BLOCK, HIDDEN)
        kv_args = SimpleNamespace(engine_rank=0)
        kv_args.aux_data_ptrs, kv_args.aux_data_lens, kv_args.aux_item_lens = buffers.get_buf_infos()
        server_args = SimpleNamespace(host=host, disaggregation_bootstrap_port=8998, tp_size=1, dp_size=1,
                                      embxfer_loopback=self.world, **server)
        return LoopbackEmbeddingManager(kv_args, mode, server_args)

    def encode_room(self, room: int, tokens: int) -> tuple[EmbeddingSender, list[int], torch.Tensor]:
        """The encode scheduler's part: a sender, blocks, ``set_buf``, ``send_embedding``."""
        sender = EmbeddingSender(self.encode, ADDR, room, [0], 0)
        blocks = self.encode.allocator.alloc(num_tokens=tokens, req_id=f"e{room}")
        assert blocks is not None
        sender.init(embedding_indices=blocks)
        embedding = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(room)).to(torch.bfloat16)
        req = SimpleNamespace(embedding=embedding, embedding_indices=blocks, fill_ids=list(range(100, 100 + tokens)),
                              multimodal_inputs=SimpleNamespace(mrope_positions=torch.arange(3 * tokens).reshape(3, -1),
                                                                mrope_position_delta=torch.tensor([[-7]])))
        self.encode.buffers.set_buf(req)
        sender.send_embedding(embedding_indices=blocks, last_chunk=True, total_tokens=tokens, block_size=BLOCK)
        return sender, blocks, embedding


def test_bad_calls_raise_typed_errors_naming_the_field() -> None:
    pair = Pair()
    receiver = EmbeddingReceiver(pair.language, ADDR, 1, None)
    with pytest.raises(LocalProtocolError) as error:
        receiver.init(embedding_indices=[5, 6], allocated_tokens=8)  # never handed out
    assert error.value.field == "embedding_indices"
    blocks = pair.language.allocator.alloc(num_tokens=8)
    with pytest.raises(LocalProtocolError) as error:
        receiver.init(embedding_indices=blocks, allocated_tokens=7)
    assert error.value.field == "allocated_tokens"
    for room in (-1, "7", 1.5, True, None):
        with pytest.raises(LocalProtocolError) as error:
            EmbeddingReceiver(pair.language, ADDR, room)
        assert error.value.field == "room"
    with pytest.raises(LocalProtocolError) as error:
        EmbeddingSender(pair.language, ADDR, 3, [0], 0)  # a sender needs the encode side's manager
    assert error.value.field == "mgr"
    sender = EmbeddingSender(pair.encode, ADDR, 3, [0], 0)
    with pytest.raises(LocalProtocolError) as error:
        sender.send_embedding(embedding_indices=[0], last_chunk=True, total_tokens=4, block_size=BLOCK * 2)
    assert error.value.field == "block_size"
    with pytest.raises(LocalProtocolError) as error:
        MultimodalDataBuffers(8, BLOCK, HIDDEN, num_deepstack_embeddings=2)
    assert error.value.field == "num_deepstack_embeddings"


def test_resume_transfer_checks_sent_tokens() -> None:
    pair = Pair(language_blocks=8)
    pair.encode_room(1, 10)
    receiver = EmbeddingReceiver(pair.language, ADDR, 1)
    first = pair.language.allocator.alloc(num_tokens=4, req_id="r1")
    receiver.init(embedding_indices=first, allocated_tokens=4)
    pair.world.run_until_idle()
    assert receiver.poll() == KVPoll.Transferring
    more = pair.language.allocator.alloc(num_tokens=6, req_id="r1")
    with pytest.raises(LocalProtocolError) as error:
        receiver.resume_transfer(embedding_indices=more, sent_tokens=5, allocated_tokens=8)
    assert error.value.field == "sent_tokens"


def test_a_free_of_blocks_a_sender_may_still_write_waits_for_the_sender() -> None:
    pair = Pair(language_blocks=8)
    receiver = EmbeddingReceiver(pair.language, ADDR, 2)
    blocks = pair.language.allocator.alloc(num_tokens=8, req_id="r2")
    receiver.init(embedding_indices=blocks, allocated_tokens=8)
    pair.world.network.deliver(0)  # the init reaches the encode side; its reply is still in flight
    receiver.abort()
    with pytest.raises(TransferFailed, match="aborted by the language scheduler"):
        receiver.failure_exception()
    pair.language.allocator.free(block_indices=blocks, req_id="r2")  # the fork frees at once
    link = pair.language.language_link(ADDR)
    assert pair.language.allocator.available_size() == 6  # deferred: the sender may still write them
    assert link.endpoint.stats["frees_deferred"] == 1
    pair.world.run_until_idle()  # the abort's acknowledgement
    assert pair.language.allocator.available_size() == 8
    assert pair.world.violations() == []


def test_a_scheduler_that_resumes_every_round_sees_transferring_after_each(monkeypatch: Any) -> None:
    monkeypatch.setattr(LoopbackEmbeddingManager, "continue_rounds", False)
    pair = Pair(language_blocks=2)
    _, _, embedding = pair.encode_room(4, 30)
    receiver = EmbeddingReceiver(pair.language, ADDR, 4)
    allocator, buffers = pair.language.allocator, pair.language.buffers
    blocks = allocator.alloc(num_tokens=8, req_id="r4")
    receiver.init(embedding_indices=blocks, allocated_tokens=8)
    rows, sent, transferring = [], 0, 0
    for _ in range(50):
        pair.world.run_until_idle()
        poll = receiver.poll()
        if poll == KVPoll.Success:
            rows.append(buffers.get_buf(blocks, actual_total_length=30 - sent)[0])
            allocator.free(block_indices=blocks)
            break
        assert poll == KVPoll.Transferring  # a round landed: this scheduler reads, frees, resumes
        transferring += 1
        landed = buffers.get_buf(blocks, actual_total_length=min(len(blocks) * BLOCK, 30 - sent))[0]
        rows.append(landed)
        sent += landed.shape[0]
        allocator.free(block_indices=blocks)
        blocks = allocator.alloc(num_tokens=30 - sent, req_id="r4")  # the partial allocator: what is free
        receiver.resume_transfer(embedding_indices=blocks, sent_tokens=sent, allocated_tokens=len(blocks) * BLOCK)
        assert receiver.poll() == KVPoll.WaitingForInput  # the round is in flight
    assert torch.equal(torch.cat(rows), embedding)
    assert transferring == 3  # rounds of 8, 8, 8 and 6 tokens: two blocks a round
    assert allocator.available_size() == 2 and pair.language.rooms() == 0


def test_a_request_waiting_for_blocks_spends_no_bootstrap_time_until_admission_timeout() -> None:
    pair = Pair()
    receiver = EmbeddingReceiver(pair.language, ADDR, 5)
    settings = pair.language.settings
    pair.world.advance(settings.bootstrap_timeout * 2)
    assert receiver.poll() == KVPoll.WaitingForInput  # waiting for blocks costs no bootstrap time
    pair.world.advance(settings.admission_timeout)
    assert receiver.poll() == KVPoll.Failed
    with pytest.raises(TransferFailed, match="admission_timeout"):
        receiver.failure_exception()


def test_an_encode_request_no_language_server_asks_for_fails_after_bootstrap_timeout() -> None:
    pair = Pair()
    sender = EmbeddingSender(pair.encode, ADDR, 6, [0], 0)
    assert sender.poll() == KVPoll.Bootstrapping
    pair.world.advance(pair.encode.settings.bootstrap_timeout + 1)
    assert sender.poll() == KVPoll.Failed
    with pytest.raises(TransferFailed, match="no language server asked"):
        sender.failure_exception()


def test_an_unknown_encode_address_fails_the_request_with_the_address() -> None:
    pair = Pair()
    receiver = EmbeddingReceiver(pair.language, "10.0.0.99:8998", 7)
    assert receiver.poll() == KVPoll.Failed
    with pytest.raises(TransferFailed, match="10.0.0.99:8998"):
        receiver.failure_exception()


def test_a_second_free_of_the_same_blocks_is_counted_not_applied() -> None:
    allocator = ReqToMetadataBlockAllocator(8, block_size=BLOCK)
    blocks = allocator.alloc(num_tokens=8, req_id="x")
    assert blocks is not None and allocator.available_size() == 6
    allocator.free(block_indices=blocks, req_id="x")
    allocator.free(block_indices=blocks)  # the fork can free twice (after a re-prefill)
    assert allocator.double_frees == 1 and allocator.available_size() == 8
    again = allocator.alloc(num_tokens=32)
    assert again is not None and len(again) == 8  # the pool is whole, no block counted twice
    assert allocator.alloc(num_tokens=1) is None
