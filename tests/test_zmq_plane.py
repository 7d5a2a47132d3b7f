"""The zmq data plane: the receiver refuses and counts bad data messages without losing its
thread; a write to a peer that is gone, or that never answers, ends with a reason; no
Mooncake is needed.  Every wait is on a condition with a timeout, never a sleep."""

from __future__ import annotations

import threading

import attrs
import pytest
import zmq

from embxfer.adapters import EncodeServer, LanguageClient, Poll, connect_local
from embxfer.adapters._serve import add_settings_flags, settings_from
from embxfer.adapters.workload import room_data
from embxfer.core import AuxHeader, PoolLayout, Settings, WriteRows
from embxfer.transports import mooncake, zmq_plane
from embxfer.transports.buffers import SourceRows

S = Settings(block_size=16, default_blocks=2, pool_blocks=8, hidden_size=32, dtype="float32", data_plane="zmq",
             transfer_timeout=30.0, waiting_timeout=30.0)
ROW = S.hidden_size * 4
WAIT = 20.0  # generous bound for a condition that holds within milliseconds


def _message(token, room, runs, *, rank=0, round_=0, sent_tokens=0, num_tokens=None, aux_block=-1, write_id=7, sizes=None):
    """A data message as a sender would build it (zero-filled rows), with knobs to break it."""
    num_tokens = sum(length for _, _, length in runs) if num_tokens is None else num_tokens
    header = zmq_plane._HEADER.pack(zmq_plane._DATA_MAGIC, write_id, token, room, rank, round_, sent_tokens, num_tokens,
                                    aux_block, len(runs))
    header += b"".join(zmq_plane._RUN.pack(*run) for run in runs)
    frames = [header]
    for _, _, length in runs:
        emb, fill, mrope = sizes or (length * ROW, length * 8, length * 24)
        frames += [bytes(emb), bytes(fill), bytes(mrope)]
    if aux_block >= 0:
        frames.append(zmq_plane._AUX.pack(*AuxHeader(room, num_tokens, 0, S.hidden_size, S.dtype).to_words()))
    return frames


class FakeSender:
    """A bare DEALER on a receiver's data socket: sends crafted messages, reads the acks."""

    def __init__(self, session_id: str) -> None:
        self.address, self.token = zmq_plane.parse_data_session(session_id)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.address)

    def ack(self) -> tuple[int, int, str]:
        assert self.socket.poll(WAIT * 1000), "no acknowledgement"
        head, reason = self.socket.recv_multipart()
        _, write_id, placed = zmq_plane._ACK.unpack(head)
        return write_id, placed, reason.decode()

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def test_bad_data_messages_are_refused_counted_and_the_receiver_thread_survives():
    with connect_local(S) as link:
        rx = link.receivers[0]
        rx.init(1)  # room 1 holds blocks 0..1 (slots 0..31) for round 0, aux in block 0
        with rx.changed:
            assert rx.changed.wait_for(lambda: rx.endpoint.rooms[1].allocation is not None, WAIT)
        fake = FakeSender(rx.data_receiver.session_id)
        try:
            fake.socket.send_multipart([b"not a data message"])  # no write id: counted, no answer
            cases = {
                "outside the pool": _message(fake.token, 1, [(S.pool_tokens - 8, 0, 16)], aux_block=0),
                "does not own slots": _message(fake.token, 1, [(64, 0, 32)], aux_block=4),  # blocks 4..5: free
                "is not receiving": _message(fake.token, 99, [(0, 0, 16)], aux_block=0),
                "expected": _message(fake.token, 1, [(0, 0, 16)], aux_block=0, sizes=(16 * ROW - 1, 128, 384)),
                "wrong session token": _message(fake.token ^ 1, 1, [(0, 0, 16)], aux_block=0),
                "aux block": _message(fake.token, 1, [(0, 0, 16)]),  # round 0 without its aux record
            }
            for write_id, (needle, frames) in enumerate(cases.items(), 100):
                frames[0] = frames[0][:4] + write_id.to_bytes(8, "little") + frames[0][12:]
                fake.socket.send_multipart(frames)
                got_id, placed, reason = fake.ack()
                assert (got_id, placed) == (write_id, 0) and needle in reason, (needle, reason)
        finally:
            fake.close()
        assert rx.stats()["data_refused"] == 1 + len(cases)
        assert not rx.buffers.embeddings.any() and not rx.buffers.aux.any()  # nothing landed
        # the same thread still carries the real round, and room 1 was not harmed
        data = room_data(5, 1, S, num_tokens=20)
        link.sender.send(1, data)
        assert rx.wait(1, timeout=WAIT) == Poll.Success, rx.failure(1)
        assert rx.take(1).same_bytes(data)
        assert link.free_blocks()["receivers"] == [S.pool_blocks]
        assert rx.stats()["data_rounds_placed"] == 1


def test_a_frame_larger_than_the_pool_drops_its_sender_before_it_lands():
    with connect_local(S) as link:
        rx = link.receivers[0]
        fake = FakeSender(rx.data_receiver.session_id)
        monitor = fake.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            fake.socket.send_multipart([b"x" * 64, bytes(S.pool_tokens * ROW + 1)])
            assert monitor.poll(WAIT * 1000), "the oversized sender was not disconnected"
        finally:
            fake.socket.disable_monitor()
            monitor.close(linger=0)
            fake.close()
        assert "data_refused" not in rx.stats()  # libzmq dropped it; it never reached the thread
        data = room_data(5, 2, S, num_tokens=9)
        rx.init(2)
        link.sender.send(2, data)
        assert rx.wait(2, timeout=WAIT) == Poll.Success, rx.failure(2)
        assert rx.take(2).same_bytes(data)


def _writer_case(ack_timeout: float = 30.0):
    """A ZmqWriter with one staged room and a fake receiver (a bare ROUTER) to write to."""
    writer = zmq_plane.ZmqWriter(S.block_size, ack_timeout=ack_timeout)
    writer.stage(1, SourceRows(room_data(5, 1, S, num_tokens=20)))
    context = zmq.Context()
    receiver = context.socket(zmq.ROUTER)
    receiver.setsockopt(zmq.LINGER, 0)
    port = receiver.bind_to_random_port("tcp://127.0.0.1")
    session = zmq_plane.data_session(f"tcp://127.0.0.1:{port}", 1234)
    write = WriteRows(1, 0, 0, 0, 20, ((0, 0, 20),), AuxHeader(1, 20, 0, S.hidden_size, S.dtype), 0)
    return writer, context, receiver, session, write


class Done:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.calls: list[tuple[WriteRows, str | None]] = []

    def __call__(self, write: WriteRows, error: str | None) -> None:
        self.calls.append((write, error))
        self.event.set()

    def wait(self) -> str | None:
        assert self.event.wait(WAIT), "on_done never fired"
        assert len(self.calls) == 1
        return self.calls[0][1]


LAYOUT = PoolLayout(0, S.pool_tokens, 0, 0, 0, 0)


def test_a_peer_that_disappears_mid_write_fails_the_write_and_the_writer_goes_on():
    writer, context, receiver, session, write = _writer_case()
    try:
        done = Done()
        writer.submit(write, session, LAYOUT, done)
        assert receiver.poll(WAIT * 1000), "the round never reached the receiver"
        frames = receiver.recv_multipart()
        assert len(frames) == 1 + 1 + 3 + 1  # identity, header, one run's three frames, aux
        receiver.close()  # gone before acknowledging
        error = done.wait()
        assert error is not None and "disconnected" in error, error
        # the writer thread survived: a live receiver gets the next write and acknowledges it
        again = context.socket(zmq.ROUTER)
        port = again.bind_to_random_port("tcp://127.0.0.1")
        done = Done()
        writer.submit(write, zmq_plane.data_session(f"tcp://127.0.0.1:{port}", 1234), LAYOUT, done)
        assert again.poll(WAIT * 1000)
        identity, head, *_ = again.recv_multipart()
        write_id = zmq_plane._HEADER.unpack_from(head)[1]
        again.send_multipart([identity, zmq_plane._ACK.pack(zmq_plane._ACK_MAGIC, write_id, 1), b""])
        assert done.wait() is None
    finally:
        writer.close()
        context.destroy(linger=0)


def test_a_peer_that_never_acknowledges_fails_the_write_after_the_ack_timeout():
    writer, context, receiver, session, write = _writer_case(ack_timeout=0.3)
    try:
        done = Done()
        writer.submit(write, session, LAYOUT, done)
        error = done.wait()
        assert error is not None and "no acknowledgement" in error, error
        assert writer.stats()["rounds_failed"] == 1
    finally:
        writer.close()
        context.destroy(linger=0)


def test_writes_outside_the_peer_pool_or_after_close_end_in_on_done_not_a_hang():
    writer, context, receiver, session, write = _writer_case()
    try:
        done = Done()
        writer.submit(WriteRows(1, 0, 1, 0, 16, ((S.pool_tokens - 8, 0, 16),)), session, LAYOUT, done)
        assert "outside the peer's pool" in (done.wait() or "")
        done = Done()
        writer.submit(write, "127.0.0.1:15000", LAYOUT, done)  # a Mooncake session id
        assert "not a zmq data-plane session" in (done.wait() or "")
        # in flight when the writer closes: failed, never left waiting
        done = Done()
        writer.submit(write, session, LAYOUT, done)
        assert receiver.poll(WAIT * 1000)
        writer.close()
        assert "closed" in (done.wait() or "")
        done = Done()
        writer.submit(write, session, LAYOUT, done)
        assert "closed" in (done.wait() or "")
    finally:
        writer.close()
        context.destroy(linger=0)


def test_receiver_data_socket_gone_fails_the_room_on_both_sides_and_frees_everything():
    with connect_local(S) as link:
        rx = link.receivers[0]
        rx.init(1)
        rx.data_receiver.close()  # the data socket disappears; the control plane stays up
        link.sender.send(1, room_data(5, 1, S, num_tokens=20))
        assert rx.wait(1, timeout=WAIT) == Poll.Failed
        assert "data write of round 0 to rank 0 failed: data connection to tcp://" in link.sender.failure(1)
        assert "aborted by sender" in rx.failure(1)
        with link.sender.changed:
            assert link.sender.changed.wait_for(lambda: link.sender.sources_held() == 0, WAIT)
        assert link.free_blocks() == {"receivers": [S.pool_blocks], "pool_blocks": S.pool_blocks, "sender_sources_held": 0}


def test_zmq_data_plane_needs_no_mooncake(monkeypatch):
    def missing():
        raise mooncake.MooncakeUnavailable("Mooncake transfer engine is not available (No module named 'mooncake')")

    monkeypatch.setattr(mooncake, "load_transfer_engine", missing)
    with connect_local(S, receivers=2) as link:
        assert link.sender.engine is None and all(rx.engine is None for rx in link.receivers)
        data = room_data(5, 3, S, num_tokens=70)  # a resume round on each rank
        for rx in link.receivers:
            rx.init(3)
        link.sender.send(3, data)
        for rx in link.receivers:
            assert rx.wait(3, timeout=WAIT) == Poll.Success, rx.failure(3)
            assert rx.take(3).same_bytes(data)


def test_both_sides_refuse_a_peer_on_the_other_data_plane():
    server = EncodeServer(S)
    try:
        with pytest.raises(ConnectionError, match="encode side has data_plane zmq, language side mooncake"):
            LanguageClient(attrs.evolve(S, data_plane="mooncake"), server.bootstrap_addr)
        assert server.stats()["registrations_rejected"] == 1
    finally:
        server.close()


def test_data_plane_flag_and_environment():
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    assert settings_from(parser.parse_args(["--data-plane", "zmq"])).data_plane == "zmq"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBXFER_DATA_PLANE", "zmq")
        assert settings_from(parser.parse_args([])).data_plane == "zmq"
        assert settings_from(parser.parse_args(["--data-plane", "mooncake"])).data_plane == "mooncake"
