"""The SGLang fork's own queue loops (re-created in ``embxfer.adapters.sglang.fork_loops``) drive
embxfer with their call sites unchanged, over the loopback and over ZeroMQ + Mooncake: exact rows,
every block back, every record forgotten, failures with their reasons."""

from __future__ import annotations

import random
from typing import Any

import pytest

from embxfer.adapters.sglang import KVPoll
from embxfer.adapters.sglang import deployment as deployment_module
from embxfer.adapters.sglang.deployment import ForkDeployment

ENCODE_HOSTS = deployment_module.ENCODE_HOSTS


@pytest.fixture(params=["loopback", "wires"])
def transport(request: Any) -> str:
    return str(request.param)


class Deployment(ForkDeployment):
    """The package's deployment, with the checks as assertions."""

    def check_exact(self, room: int) -> None:
        assert self.exact(room), f"room {room} not prefilled with exactly its rows: {self.aborted(room)}"

    def check_clean(self) -> None:
        """Every block back on every pool, every record forgotten, no write out of place."""
        assert self.leftovers() == {}


@pytest.fixture
def deploy(transport: str) -> Any:
    made: list[Deployment] = []

    def make(**options: Any) -> Deployment:
        made.append(Deployment(transport, **options))
        return made[-1]

    yield make
    for deployment in made:
        deployment.close()


def test_2000_tokens_in_two_rounds(deploy: Any) -> None:
    deployment = deploy()
    deployment.request(1, 2000)
    deployment.run()
    deployment.check_exact(1)
    deployment.check_clean()
    receiver_stats = deployment.language[0].prealloc_queue.data_manager.rows
    assert receiver_stats.landed  # rows were read where they landed, not copied by embxfer


def test_50000_tokens_through_a_small_pool_in_many_rounds(deploy: Any) -> None:
    deployment = deploy(language_blocks=16, encode_blocks=400)
    deployment.request(7, 50_000)
    deployment.run()
    deployment.check_exact(7)
    deployment.check_clean()
    link = deployment.language[0].prealloc_queue.data_manager.language_link(f"{ENCODE_HOSTS[0]}:{deployment.port}")
    assert link.endpoint.stats["rows_received"] == 50_000
    assert link.endpoint.stats["resume_rounds:48"] == 1  # 1,024, then 48 rounds of at most 1,024


def test_14_concurrent_requests_in_a_32_block_pool(deploy: Any) -> None:
    deployment = deploy(language_blocks=32)
    lengths = {room: random.Random(room).randint(100, 3000) for room in range(100, 114)}
    for room, tokens in lengths.items():
        deployment.request(room, tokens)
    deployment.run()
    for room in lengths:
        deployment.check_exact(room)
    deployment.check_clean()


def test_two_encode_servers_feed_one_language_pool(deploy: Any) -> None:
    deployment = deploy(encoders=2, language_blocks=24)
    for room in range(20, 30):
        deployment.request(room, 700 + 97 * room, host=ENCODE_HOSTS[room % 2])
    deployment.run()
    for room in range(20, 30):
        deployment.check_exact(room)
    deployment.check_clean()
    manager = deployment.language[0].prealloc_queue.data_manager
    assert sorted(manager._links) == [f"{host}:{deployment.port}" for host in ENCODE_HOSTS]
    assert len({id(link.endpoint.allocator) for link in manager._links.values()}) == 1  # one pool


def test_fan_out_to_two_language_ranks_with_a_mixed_outcome(deploy: Any) -> None:
    deployment = deploy(language_tp=2, language_blocks=32)
    for room in (40, 41, 42):
        deployment.request(room, 1500)
    for _ in range(10_000):  # the language ranks init every request; the encode side has not run yet
        for scheduler in deployment.language:
            scheduler.step()
        if all(len(s.transfer_queue.queue) == 3 for s in deployment.language):
            break
        deployment.settle()
    deployment.language[1].abort_request("r41")  # one rank gives up on one request
    deployment.run()
    deployment.check_exact(40)
    deployment.check_exact(42)
    messages = deployment.aborted(41)
    assert len(messages) == 3, messages  # both language ranks and the encode side fail it
    rank1 = [r.finished_reason.message for r in deployment.language[1].streamed if r.bootstrap_room == 41]
    assert len(rank1) == 1 and "aborted by the language scheduler" in rank1[0], rank1
    # the others learn it from rank 1, or (whichever reaches the encode side first) from rank 0
    # giving up because its all-reduced poll said Failed
    assert all("another rank" in m or "aborted by" in m for m in messages), messages
    deployment.check_clean()


@pytest.mark.parametrize("where", ["language prealloc", "language transfer", "language mid-resume",
                                   "encode bootstrap", "encode inflight", "encode while language waits for blocks"])
def test_aborts_at_each_queue(deploy: Any, where: str) -> None:
    deployment = deploy(language_blocks=8 if where.endswith("blocks") else 32)
    language, encode = deployment.language[0], deployment.encoders[ENCODE_HOSTS[0]]
    if where.endswith("waits for blocks"):
        deployment.request(60, 1024)  # takes the whole language pool until it is prefilled
        deployment.request(61, 1500)
        deployment.run(until=lambda: [r.req.rid for r in language.transfer_queue.queue] == ["r60"])
        assert [r.req.rid for r in language.prealloc_queue.queue] == ["r61"]
        encode.abort_request("r61")
        deployment.run()
        deployment.check_exact(60)
    else:
        deployment.request(61, 1500)
        deployment.request(62, 600)
        if where == "language prealloc":
            language.abort_request("r61")
        elif where == "encode bootstrap":
            encode.abort_request("r61")
        elif where == "language transfer":
            language.step()
            language.abort_request("r61")
        elif where == "language mid-resume":
            for _ in range(100):  # until the resume went out, before the network carries it
                encode.step()
                language.step()
                if any(r.partial_input_embeds is not None for r in language.transfer_queue.queue):
                    break
                deployment.settle()
            assert [r.req.rid for r in language.transfer_queue.queue if r.partial_input_embeds is not None] == ["r61"]
            language.abort_request("r61")
        elif where == "encode inflight":
            for _ in range(10_000):  # abort right after the step that sent it, before it can land
                language.step()
                encode.step()
                if "r61" in [r.rid for r in encode.inflight_queue]:
                    break
                deployment.settle()
            assert "r61" in [r.rid for r in encode.inflight_queue]  # sent, not yet finished
            encode.abort_request("r61")
        deployment.run()
        deployment.check_exact(62)
    messages = deployment.aborted(61)
    assert messages and all("aborted by" in m or "failed" in m for m in messages), messages
    assert "r61" not in language.prefilled
    deployment.check_clean()


def test_fork_environment_variables(monkeypatch: Any) -> None:
    from embxfer.core import Settings

    environ = {"SGLANG_EMBEDDING_CACHE_BLOCK_SIZE": "256", "SGLANG_EMBEDDING_CACHE_BUFFER_SIZE": "96",
               "SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE": "2048"}
    settings = Settings.from_env(environ)
    assert (settings.block_size, settings.pool_blocks, settings.default_blocks * settings.block_size) == (256, 96, 2048)


def test_poll_values_where_the_fork_polls(deploy: Any) -> None:
    deployment = deploy()
    deployment.request(5, 300)
    sender = deployment.encoders[ENCODE_HOSTS[0]].bootstrap_queue.queue[0].disagg_embedding_sender
    receiver = deployment.language[0].prealloc_queue.queue[0].embedding_receiver
    assert sender.poll() == KVPoll.Bootstrapping  # polled at once, before any receiver reached it
    assert receiver.poll() == KVPoll.WaitingForInput  # bootstrapped, ready for init
    deployment.run()
    deployment.check_exact(5)
    assert sender.poll() == KVPoll.Success and receiver.poll() == KVPoll.Success  # latched, records gone
