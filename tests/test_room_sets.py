"""A rank speaks only for rooms of its own set (the ranks its inits name, required_dst_info_num).

Without authentication, anyone can register a rank nobody holds.  A stranger registered as
rank 1 of a set of 2 beside an honest rank 0 of 1 must not end, poison or take over the
honest rooms: its aborts, resumes and inits of those rooms are dropped (``foreign_dropped``),
and the tombstones its early aborts leave do not apply to the honest set's inits."""

from __future__ import annotations

from embxfer.core import Abort, AbortAck, Heartbeat, Init, Poll, Register, Resume, SendMessage, Sender, Settings
from embxfer.core._sender_peers import MAX_RANKS

S = Settings(block_size=4, default_blocks=2, pool_blocks=8, hidden_size=8, dtype="float32")


def register(rank: int, required: int, incarnation: int) -> Register:
    return Register(rank, required, incarnation, S.block_size, S.hidden_size, S.dtype, "rx", "", S.data_plane)


def init(room: int, rank: int = 0, required: int = 1) -> Init:
    return Init(room, rank, required, S.block_size, 8, ((0, 2),))


def honest_and_stranger() -> Sender:
    sender = Sender(S, incarnation=77)
    sender.receive(register(0, 1, 1), 0.0)  # the honest language process
    sender.receive(register(1, 2, 666), 0.0)  # a stranger, as rank 1 of a set of 2
    return sender


def test_a_strangers_abort_ends_nothing_of_a_room_it_never_joined() -> None:
    sender = honest_and_stranger()
    sender.receive(init(5), 0.1)
    sender.send(5, 20, 0, 0.1)
    before = sender.poll(5)
    [ack] = [a for a in sender.receive(Abort(5, 1, "hostile"), 0.2)]  # an ack to it alone: it was never written
    assert isinstance(ack.message, AbortAck) and ack.rank == 1
    assert sender.poll(5) == before != Poll.Failed
    assert sender.stats["foreign_dropped"] == 1


def test_an_early_abort_by_the_application_is_not_rewritten_by_a_strangers_abort() -> None:
    sender = honest_and_stranger()
    sender.abort(9, 0.1, "the application gave up")
    sender.receive(Abort(9, 1, "hostile"), 0.2)
    actions = sender.receive(init(9), 0.3)
    [abort] = [a.message for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Abort)]
    assert abort.reason == "the application gave up" and 9 not in sender.rooms  # the init opened nothing


def test_a_strangers_early_aborts_do_not_poison_the_honest_sets_room_ids() -> None:
    sender = honest_and_stranger()
    for room in range(10):
        sender.receive(Abort(room, 1, "hostile"), 0.1)  # before any init: tombstones of the stranger's set
    actions = sender.receive(init(3), 0.2)
    assert not [a for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Abort)]
    assert sender.poll(3) != Poll.Failed and sender.early_abort(3) is None
    assert sender.stats["foreign_tombstones_ignored"] == 1


def test_a_strangers_resume_and_init_of_an_honest_room_are_dropped() -> None:
    sender = honest_and_stranger()
    sender.receive(init(5), 0.1)
    sender.send(5, 20, 0, 0.1)
    sender.receive(Resume(5, 1, 1, 8, 8, ((2, 2),)), 0.2)
    sender.receive(Init(5, 1, 2, S.block_size, 8, ((4, 2),)), 0.2)
    assert sender.poll(5) != Poll.Failed and sender.stats["foreign_dropped"] == 2
    assert set(sender.rooms[5].destinations) == {0}


def test_within_a_set_an_abort_before_its_own_init_still_ends_the_room() -> None:
    """Fan-out: rank 1 of 2 gives a room up before its init went out; rank 0 already joined."""
    sender = Sender(S, incarnation=77)
    sender.receive(register(0, 2, 1), 0.0)
    sender.receive(register(1, 2, 2), 0.0)
    sender.receive(init(5, 0, 2), 0.1)
    actions = sender.receive(Abort(5, 1, "gave up"), 0.2)
    assert sender.poll(5) == Poll.Failed and sender.failure(5) == "aborted by receiver rank 1: gave up"
    assert [a.message for a in actions if isinstance(a, SendMessage) and isinstance(a.message, AbortAck)]


def test_ranks_that_register_and_never_speak_are_forgotten_once_silent() -> None:
    """100,000 Registers of distinct ranks: nothing of theirs stays past the heartbeat limit."""
    sender = Sender(S, incarnation=77)
    sender.receive(register(0, 1, 1), 0.0)
    for rank in range(1, 200):
        sender.receive(register(rank, 1000, rank + 10), 0.0)
    sender.receive(init(5), 0.5)  # the honest rank speaks
    limit = S.heartbeat_interval * S.heartbeat_misses
    for second in range(1, int(limit) + 2):
        sender.receive(Heartbeat(0, 1, second), float(second))
        sender.tick(float(second))
    assert set(sender.peers) == {0} and sender.stats["peers_evicted"] == 199 and sender.stats["peers_lost"] == 0
    assert sender.peer_alive(0) and sender.poll(5) != Poll.Failed


def test_registrations_beyond_the_rank_limit_are_refused_with_why() -> None:
    sender = Sender(S, incarnation=77)
    for rank in range(MAX_RANKS):
        sender.receive(register(rank, MAX_RANKS + 1, rank + 1), 0.0)
    [reply] = [a.message for a in sender.receive(register(MAX_RANKS, MAX_RANKS + 1, 9), 0.0)]
    assert reply.accepted == 0 and reply.reason.startswith(f"this encode side serves at most {MAX_RANKS} language ranks")
    assert sender.stats["registrations_over_limit"] == 1


# -- a stranger's init cannot reserve an id, nor can a rank's inits outgrow its pool -----------

def test_an_honest_init_takes_a_room_over_from_a_strangers_incomplete_set() -> None:
    """The stranger (rank 1 of a set of 2) inits room 5 first: its set can never complete
    while rank 0 is held, so the honest set of 1 takes the id over before anything is written."""
    sender = honest_and_stranger()
    sender.receive(Init(5, 1, 2, S.block_size, 8, ((4, 2),)), 0.1)
    actions = sender.receive(init(5), 0.2)
    [abort] = [a for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Abort)]
    assert abort.rank == 1 and abort.message.reason == "room id taken by rank 0 of a set of 1"
    assert set(sender.rooms[5].destinations) == {0} and sender.stats["rooms_taken_over"] == 1
    writes = sender.send(5, 8, 0, 0.3)
    assert [a.rank for a in writes if type(a).__name__ == "WriteRows"] == [0]
    # the stranger's init again, now foreign to the honest set: dropped
    sender.receive(Init(5, 1, 2, S.block_size, 8, ((4, 2),)), 0.4)
    assert sender.stats["foreign_dropped"] == 1 and set(sender.rooms[5].destinations) == {0}


def test_a_set_that_includes_the_new_ranks_is_not_taken_over() -> None:
    """Fan-out: rank 0 of a set of 2 already joined; rank 0 of a set of 1 (a different init
    of the same rank) fails the room as before, it does not take it."""
    sender = Sender(S, incarnation=77)
    sender.receive(register(0, 2, 1), 0.0)
    sender.receive(init(5, 0, 2), 0.1)
    sender.receive(init(5, 0, 1), 0.2)
    assert sender.poll(5) == Poll.Failed and sender.stats.get("rooms_taken_over", 0) == 0


def test_a_ranks_live_rooms_name_at_most_twice_its_pool() -> None:
    """Each live room holds blocks of its rank's pool: inits past twice the pool (plus a
    little) are refused with an abort, and open nothing; what ends gives its share back."""
    sender = Sender(S, incarnation=77)
    sender.receive(register(0, 1, 1), 0.0)
    allowance = 2 * S.pool_blocks + 16
    assert sender.extents_allowed(0) == allowance
    one_block = [Init(room, 0, 1, S.block_size, S.block_size, ((room % S.pool_blocks, 1),)) for room in range(allowance + 1)]
    for message in one_block[:-1]:
        sender.receive(message, 0.1)
    assert sender.extents_allowed(0) == 0 and len(sender.rooms) == allowance
    [refusal] = sender.receive(one_block[-1], 0.1)
    assert isinstance(refusal.message, Abort) and "its pool allows 32" in refusal.message.reason
    assert one_block[-1].room not in sender.rooms and sender.stats["over_pool_refused"] == 1
    sender.abort(0, 0.2)  # one room ends: its extent counts no more
    assert sender.extents_allowed(0) == 1
    sender.receive(one_block[-1], 0.3)
    assert one_block[-1].room in sender.rooms and sender.extents_allowed(0) == 0


def test_a_resume_names_its_rounds_blocks_in_place_of_the_last_rounds() -> None:
    sender = Sender(S, incarnation=77)
    sender.receive(register(0, 1, 1), 0.0)
    sender.receive(Init(5, 0, 1, S.block_size, 8, ((0, 1), (2, 1))), 0.1)
    [write] = [a for a in sender.send(5, 20, 0, 0.1) if type(a).__name__ == "WriteRows"]
    sender.write_done(5, 0, 0, 0.2)
    assert sender.extents_allowed(0) == 2 * S.pool_blocks + 16 - 2
    sender.receive(Resume(5, 0, 1, 8, 12, ((4, 3),)), 0.3)
    assert sender.extents_allowed(0) == 2 * S.pool_blocks + 16 - 1


def _writing_room(room: int) -> Sender:
    """A sender with one room whose round 0 write to rank 0 is in flight."""
    sender = Sender(S, incarnation=77)
    sender.receive(register(0, 1, 1), 0.0)
    sender.receive(Init(room, 0, 1, S.block_size, 8, ((0, 2),)), 0.1)
    assert any(type(a).__name__ == "WriteRows" for a in sender.send(room, 20, 0, 0.1))
    return sender


def _messages(actions, kind):  # type: ignore[no-untyped-def]
    return [a.message for a in actions if isinstance(getattr(a, "message", None), kind)]


def test_a_write_given_up_while_its_bytes_may_land_is_never_acknowledged_nor_aborted() -> None:
    """NIXL cannot stop a transfer it gave up on: the receiver must keep the room's blocks
    quarantined until its own quarantine_timeout, so the sender tells that rank nothing more
    of the room — no ack of its abort (then, or arriving later), no abort of its own."""
    sender = _writing_room(5)
    actions = sender.receive(Abort(5, 0, "round timeout"), 0.5)  # the receiver gave up meanwhile
    assert not _messages(actions, AbortAck)  # owed once the write ends, as on every plane
    actions = sender.write_done(5, 0, 0, 0.6, "nixl WRITE not complete after 5 s", may_land=True)
    assert not _messages(actions, AbortAck) and not _messages(actions, Abort)
    assert not _messages(sender.receive(Abort(5, 0, "again"), 0.7), AbortAck)
    assert sender.stats["acks_withheld"] == 2 and sender.stats["writes_given_up"] == 1
    assert any(type(a).__name__ == "ReleaseSource" for a in actions)  # the write ended: the rows may go

    sender = _writing_room(6)  # given up before the receiver said anything
    actions = sender.write_done(6, 0, 0, 0.6, "given up", may_land=True)
    assert sender.poll(6) == Poll.Failed and not _messages(actions, Abort)
    assert not _messages(sender.receive(Abort(6, 0, "round timeout"), 0.7), AbortAck)

    sender = _writing_room(7)  # a write that failed cleanly: acknowledged as before
    sender.receive(Abort(7, 0, "round timeout"), 0.5)
    assert _messages(sender.write_done(7, 0, 0, 0.6, "refused"), AbortAck)
