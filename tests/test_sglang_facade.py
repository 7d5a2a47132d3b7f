import pytest

from embxfer.adapters import Poll, connect_local, connect_loopback
from embxfer.adapters.sglang import EmbeddingReceiver, EmbeddingSender, TransferFailed
from embxfer.core import ProtocolError, Settings

from helpers import rows

S = Settings(block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32", transfer_timeout=3.0)


def test_fork_call_sequence_over_loopback():
    link = connect_loopback(S)
    data = rows(30, S)
    receiver = EmbeddingReceiver(link.receivers[0], bootstrap_room=77)
    sender = EmbeddingSender(link.sender, bootstrap_room=77)
    receiver.init(allocation=[0, 1], allocated_tokens=8)
    sender.init(num_tokens=30)
    sender.send_embedding(data.embeddings, data.fill_ids, data.mrope_positions, data.mrope_position_delta)
    link.run_until_idle()
    assert sender.poll() == Poll.Success == 4 and receiver.poll() == Poll.Success
    receiver.resume_transfer(allocation=[2], sent_tokens=8)  # a no-op: embxfer resumed by itself
    embeddings, fill_ids, mrope, delta = receiver.take()
    assert embeddings.equal(data.embeddings) and fill_ids.equal(data.fill_ids) and mrope.equal(data.mrope_positions)
    assert delta == data.mrope_position_delta


def test_failure_exception_carries_the_reason():
    link = connect_loopback(S)
    receiver = EmbeddingReceiver(link.receivers[0], 5)
    sender = EmbeddingSender(link.sender, 5)
    receiver.init()
    link.run_until_idle()
    sender.abort()
    link.run_until_idle()
    assert receiver.poll() == Poll.Failed == 0
    with pytest.raises(TransferFailed, match="aborted by sender"):
        receiver.failure_exception()
    with pytest.raises(TransferFailed, match="aborted by sender"):
        sender.failure_exception()


def test_resume_transfer_rejects_a_position_past_what_arrived():
    link = connect_loopback(S)
    receiver = EmbeddingReceiver(link.receivers[0], 9)
    receiver.init()
    with pytest.raises(ProtocolError) as err:
        receiver.resume_transfer(sent_tokens=100)
    assert err.value.field == "sent_tokens"


def test_fork_call_sequence_over_zmq_and_mooncake():
    with connect_local(S) as link:
        data = rows(50, S)
        receiver = EmbeddingReceiver(link.receivers[0], 3)
        sender = EmbeddingSender(link.sender, 3)
        receiver.init()
        sender.send_embedding(data.embeddings, data.fill_ids, data.mrope_positions, data.mrope_position_delta)
        assert link.receivers[0].wait(3, timeout=30) == Poll.Success
        embeddings, fill_ids, mrope, delta = receiver.take()
        assert embeddings.equal(data.embeddings) and mrope.equal(data.mrope_positions)
