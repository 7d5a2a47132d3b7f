"""One conformance suite that every transport must pass: loopback (in-memory, scheduled),
ZeroMQ control + Mooncake over TCP, ZeroMQ control + zero-copy zmq data frames, both on
127.0.0.1 (real sockets, real threads; the zmq data plane needs no Mooncake), and ZeroMQ
control + shared memory (the receiver's pool in a memfd the sender maps), and ZeroMQ control
+ NIXL WRITEs over UCX.

Each case checks exact rows on every receiver rank and every block back in every pool."""

from __future__ import annotations

import attrs
import pytest
import torch

from embxfer.adapters import EmbeddingData, Poll, connect_local, connect_loopback
from embxfer.adapters.workload import room_data
from embxfer.core import HOST_MEMORY_PLANES, Settings
from embxfer.specs import invariants
from embxfer.transports.buffers import pool_device

from conftest import require_plane
from helpers import wait_until


def require_device(kind: str, device: str) -> None:
    """Skip, saying why, a device this host lacks or a plane that cannot write it."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): "
                    f"the {device} cases run on a GPU host (.ci/gpu-check)")
    if kind in HOST_MEMORY_PLANES:
        pytest.skip(f"the {kind} plane writes the pool as host memory (Settings refuses device {device!r})")


def on_device(data: EmbeddingData, device: str) -> EmbeddingData:
    """The sender's rows on ``device`` (it takes rows on any device)."""
    if device == "cpu":
        return data
    return EmbeddingData(data.embeddings.to(device), data.fill_ids.to(device), data.mrope_positions.to(device),
                         data.mrope_position_delta)


class Harness:
    """Drive either kind of link with the same calls, its pool (and the sender's rows) on ``device``."""

    def __init__(self, kind: str, settings: Settings, receivers: int, device: str = "cpu") -> None:
        require_plane(kind)
        require_device(kind, device)
        settings = attrs.evolve(settings, device=device)
        self.kind = kind
        self.device = device
        self.settings = settings
        if kind == "loopback":
            self.link = connect_loopback(settings, receivers)
        else:
            self.link = connect_local(settings, receivers, data_plane=kind)

    def transfer(self, lengths: dict[int, int], *, send_first: bool = False) -> dict[int, object]:
        sent = {room: room_data(11, room, self.settings, num_tokens=n) for room, n in lengths.items()}
        for room, data in sent.items():
            if send_first:
                self.link.sender.send(room, on_device(data, self.device))
            for rx in self.link.receivers:
                rx.init(room)
            if not send_first:
                self.link.sender.send(room, on_device(data, self.device))
        if self.kind == "loopback":
            self.link.run_until_idle()
        else:
            self.link.wait(sent, timeout=60)
        for room, data in sent.items():
            for rx in self.link.receivers:
                assert rx.poll(room) == Poll.Success, (room, rx.failure(room))
                result = rx.take(room)
                assert result.embeddings.device == pool_device(self.settings)  # results live where the pool does
                assert not invariants.rows_equal(data, result), f"room {room}"
        return sent

    def assert_all_free(self) -> None:
        if self.kind != "loopback":
            # the encode side lets a source go when the last write's completion reaches its
            # I/O thread, which may be just after the receiver saw Success
            sender = self.link.sender
            wait_until(sender, lambda: sender.sources_held() == 0, 30, "every source released")
        free = self.link.free_blocks()
        assert free["receivers"] == [self.settings.pool_blocks] * len(self.link.receivers)
        assert free["sender_sources_held"] == 0
        for rx in self.link.receivers:
            assert not invariants.all_freed_once(rx.allocator)

    def close(self) -> None:
        if self.kind != "loopback":
            self.link.close()


TRANSPORTS = ["loopback", "mooncake", "zmq", "shm", "auto", "nixl"]  # (auto: shared memory, both ends on this host)
SETTINGS = Settings(block_size=16, default_blocks=4, pool_blocks=12, hidden_size=32, dtype="bfloat16")


DEVICES = ["cpu", "cuda"]  # every case on each device present (cuda: skipped, with why, where there is none)
CASES = [(kind, device) for device in DEVICES for kind in TRANSPORTS]


@pytest.fixture(params=CASES, ids=[f"{kind}-{device}" for kind, device in CASES])
def one(request):
    harness = Harness(request.param[0], SETTINGS, 1, request.param[1])
    yield harness
    harness.close()


@pytest.fixture(params=CASES, ids=[f"{kind}-{device}" for kind, device in CASES])
def two(request):
    harness = Harness(request.param[0], SETTINGS, 2, request.param[1])
    yield harness
    harness.close()


def test_no_resume(one):
    one.transfer({1: 1, 2: 63, 3: 64})
    assert {k: v for k, v in one.link.receivers[0].stats().items() if k.startswith("resume_rounds")} == {"resume_rounds:0": 3}
    one.assert_all_free()


def test_one_resume(one):
    one.transfer({1: 65})
    one.transfer({2: 64 + 128})  # the rest fits the free pool at once
    assert one.link.receivers[0].stats()["resume_rounds:1"] == 2
    one.assert_all_free()


def test_multi_round_resume_under_pool_pressure(one):
    # 12-block pool, 4-block guess: 1000 tokens need >= 5 resume rounds, several rooms compete
    one.transfer({room: 1000 + 37 * room for room in range(5)})
    rounds = {int(k.split(":")[1]) for k in one.link.receivers[0].stats() if k.startswith("resume_rounds:")}
    assert min(rounds) >= 5
    one.assert_all_free()


def test_data_ready_before_the_receiver_asks(one):
    one.transfer({4: 10, 5: 300}, send_first=True)
    one.assert_all_free()


def test_fan_out_to_two_ranks(two):
    two.transfer({1: 5, 2: 100, 3: 700})
    two.assert_all_free()


def test_200_concurrent_rooms(one):
    one.transfer({room: 1 + (room * 29) % 150 for room in range(200)})
    one.assert_all_free()
