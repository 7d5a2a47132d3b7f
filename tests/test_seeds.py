"""The seed scenarios from the historical notes, with exact rows."""

from embxfer.adapters import Poll, connect_loopback
from embxfer.core import Settings, decode
from embxfer.specs import invariants

from helpers import resume_rounds, rows, transfer

SEED = Settings(block_size=128, default_blocks=8, pool_blocks=64, hidden_size=16, dtype="bfloat16")


def test_2000_tokens_default_8x128_resumes_once_1024_then_976():
    sent = {1: rows(2000, SEED, 1)}
    statuses = []
    link = connect_loopback(SEED)
    rx = link.receivers[0]
    rx.init(1)
    link.sender.send(1, sent[1])
    # watch the Status messages that reach the receiver: one per round
    while link.network.pending:
        packet = link.network.pending[0]
        if not packet.is_data and packet.dst == rx.name:
            message = decode(packet.frames)
            if type(message).__name__ == "Status":
                statuses.append((message.round, message.sent_tokens, message.written_tokens))
        link.network.deliver(0)
    assert statuses == [(0, 0, 1024), (1, 1024, 976)]
    assert rx.poll(1) == Poll.Success
    assert not invariants.rows_equal(sent[1], rx.take(1))
    assert link.free_blocks()["receivers"] == [64]


def test_exactly_1024_tokens_needs_no_resume():
    link, sent = transfer(SEED, {5: 1024})
    rx = link.receivers[0]
    assert resume_rounds(rx) == {0: 1}
    assert rx.take(5).same_bytes(sent[5])
    assert link.free_blocks()["receivers"] == [64]


def test_50000_tokens_with_a_pool_that_cannot_hold_the_rest_takes_several_rounds():
    settings = Settings(block_size=128, default_blocks=8, pool_blocks=64, hidden_size=16, dtype="bfloat16")
    # 50000 - 1024 = 48976 remaining > 64 * 128 = 8192 pool tokens: at least 6 resume rounds
    link, sent = transfer(settings, {9: 50000})
    rx = link.receivers[0]
    (rounds,) = resume_rounds(rx)
    assert rounds == -(-(50000 - 1024) // (64 * 128)) == 6
    assert rx.take(9).same_bytes(sent[9])
    assert not invariants.all_freed_once(rx.allocator)


def test_free_list_order_from_the_notes_never_overlaps_in_a_transfer():
    """Blocks freed in the order [15..19, 14..10] and reused by two rooms: rows stay exact."""
    settings = Settings(block_size=128, default_blocks=3, pool_blocks=20, hidden_size=16, dtype="bfloat16")
    link = connect_loopback(settings)
    rx = link.receivers[0]
    held = {a.extents[0][0]: a for a in (rx.allocator.alloc(128) for _ in range(20))}
    for block in [15, 16, 17, 18, 19, 14, 13, 12, 11, 10]:
        rx.allocator.free(held.pop(block))
    data = {room: rows(n, settings, room) for room, n in ((1, 700), (2, 1000))}
    for room in data:
        rx.init(room)
    for room, d in data.items():
        link.sender.send(room, d)
    link.run_until_idle()
    assert not link.violations()
    for room, d in data.items():
        assert rx.take(room).same_bytes(d)
    for allocation in held.values():
        rx.allocator.free(allocation)
    assert not invariants.all_freed_once(rx.allocator)
