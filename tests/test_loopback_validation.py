"""Local misuse over the loopback link: bad ``EmbeddingData`` naming the field, take before
success, a second init or send; and the invariant predicates catching real breakage."""

import pytest
import torch

from embxfer.adapters import EmbeddingData, Poll, connect_loopback
from embxfer.core import LocalProtocolError
from embxfer.specs import invariants

from helpers import SMALL, rows, transfer


# -- facade input validation ----------------------------------------------------------
def test_bad_embedding_data_names_the_field():
    n = 4
    good = dict(embeddings=torch.zeros(n, 8), fill_ids=torch.zeros(n, dtype=torch.int64),
                mrope_positions=torch.zeros(3, n, dtype=torch.int64))
    for field, bad in [("embeddings", torch.zeros(n)), ("fill_ids", torch.zeros(n, dtype=torch.int32)),
                       ("mrope_positions", torch.zeros(n, 3, dtype=torch.int64)), ("embeddings", "nope")]:
        with pytest.raises(LocalProtocolError) as err:
            EmbeddingData(**{**good, field: bad})
        assert err.value.field == field
    link = connect_loopback(SMALL)
    with pytest.raises(LocalProtocolError) as err:
        link.sender.send(1, EmbeddingData(torch.zeros(n, 9), good["fill_ids"], good["mrope_positions"]))
    assert err.value.field == "embeddings" and "hidden size" in str(err.value)
    with pytest.raises(LocalProtocolError) as err:
        link.sender.send(1, EmbeddingData(torch.zeros(n, 8, dtype=torch.float16), good["fill_ids"], good["mrope_positions"]))
    assert "dtype" in str(err.value)
    # nothing was kept for the rejected sends; the link still works
    data = rows(5)
    link.receivers[0].init(1)
    link.sender.send(1, data)
    link.run_until_idle()
    assert link.receivers[0].take(1).same_bytes(data)


def test_take_before_success_and_double_init_are_local_errors():
    link = connect_loopback(SMALL)
    rx = link.receivers[0]
    rx.init(1)
    with pytest.raises(LocalProtocolError, match="WaitingForInput"):
        rx.take(1)
    with pytest.raises(LocalProtocolError, match="already"):
        rx.init(1)
    with pytest.raises(LocalProtocolError):
        rx.poll(12345)


def test_send_twice_fails_the_room_and_tells_the_receiver():
    link = connect_loopback(SMALL)
    rx = link.receivers[0]
    rx.init(1)
    link.run_until_idle()
    with pytest.raises(LocalProtocolError):
        link.sender.endpoint.send(1, 5, 0, 0.0)
        link.sender.endpoint.send(1, 5, 0, 0.0)
    assert link.sender.poll(1) == Poll.Failed
    assert "data_ready" in link.sender.failure(1)


def test_invariant_predicates_detect_real_breakage():
    link, sent = transfer(SMALL, {1: 10})
    received = link.receivers[0].take(1)
    received.embeddings[3, 2] += 1
    assert invariants.rows_equal(sent[1], received)
    allocator = link.receivers[0].allocator
    leaked = allocator.alloc(4)
    assert invariants.all_freed_once(allocator)
    allocator.free(leaked)
    assert not invariants.all_freed_once(allocator)
    assert invariants.terminal_states_final({1: ["Bootstrapping", "Success", "Transferring"]})
    assert invariants.all_terminal([(1, "Transferring")])
