"""The SGLang fork's own queue loops (re-created in ``embxfer.adapters.sglang.fork_loops``) drive
embxfer with their call sites unchanged, over the loopback and over ZeroMQ + Mooncake: exact rows,
every block back, every record forgotten, failures with their reasons."""

from __future__ import annotations

import random
import time
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
        """Every block back on every pool, every record forgotten, no write out of place
        (on real wires: once the last acknowledgements have arrived, the schedulers looping)."""
        schedulers = [*self.encoders.values(), *self.language]
        try:
            step_until(self, schedulers, lambda: not self.leftovers(), seconds=30)
        except AssertionError:
            pass
        assert self.leftovers() == {}


def abort_right_after(target: Any, method: str, abort: Any) -> list[str]:
    """Make ``target.method`` call ``abort`` the moment it returns (once); the list returned
    names the call once that has happened."""
    original = getattr(target, method)
    fired: list[str] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        # under the manager's lock, which the I/O threads need too: nothing the call started
        # can be carried (let alone land) before the abort
        with target.mgr.lock:
            result = original(*args, **kwargs)
            setattr(target, method, original)
            abort()
        fired.append(method)
        return result

    setattr(target, method, wrapped)
    return fired


def step_until(deployment: Deployment, schedulers: list[Any], condition: Any, seconds: float = 60.0) -> None:
    """Step ``schedulers`` (in order) until ``condition`` holds right after a step, checked
    before the network gets to carry anything more; the network runs between iterations."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for scheduler in schedulers:
            scheduler.step()
        if condition():
            return
        deployment.settle()
    raise AssertionError(f"not reached within {seconds} s")


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
    # the language ranks init every request; the encode side has not run yet
    step_until(deployment, deployment.language, lambda: all(len(s.transfer_queue.queue) == 3 for s in deployment.language))
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
            # the scheduler aborts the moment its resume went out (the next round in flight)
            receiver = next(r.embedding_receiver for r in language.prealloc_queue.queue if r.req.rid == "r61")
            fired = abort_right_after(receiver, "resume_transfer", lambda: language.abort_request("r61"))
            step_until(deployment, [encode, language], lambda: bool(fired))
        elif where == "encode inflight":
            # the encode scheduler aborts the moment the rows went out, before they can land
            sender = next(r.disagg_embedding_sender for r in encode.bootstrap_queue.queue if r.rid == "r61")
            fired = abort_right_after(sender, "send_embedding", lambda: encode.abort_request("r61"))
            step_until(deployment, [language, encode], lambda: bool(fired))  # (it was in the inflight queue)
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
    # Bootstrapping until the encode server answered (at once on the loopback), then ready for init
    assert receiver.poll() in ((KVPoll.WaitingForInput,) if deployment.transport == "loopback"
                               else (KVPoll.Bootstrapping, KVPoll.WaitingForInput))
    step_until(deployment, [], lambda: receiver.poll() == KVPoll.WaitingForInput)
    assert sender.poll() == KVPoll.Bootstrapping  # no init yet: the language side has not allocated
    deployment.run()
    deployment.check_exact(5)
    assert sender.poll() == KVPoll.Success and receiver.poll() == KVPoll.Success  # latched, records gone


def test_an_encode_server_that_never_answers_fails_the_request_without_blocking_the_scheduler() -> None:
    from embxfer.adapters.sglang import EmbeddingReceiver, TransferFailed
    from embxfer.adapters.sglang.deployment import environment

    with environment(EMBXFER_BOOTSTRAP_TIMEOUT="0.5"), Deployment("wires") as deployment:
        manager = deployment.language[0].prealloc_queue.data_manager
        started = time.monotonic()
        receiver = EmbeddingReceiver(manager, f"127.0.0.3:{deployment.port}", 99, None)  # nothing listens there
        assert receiver.poll() == KVPoll.Bootstrapping
        assert time.monotonic() - started < 0.5  # the constructor does not wait for the encode server
        step_until(deployment, [], lambda: receiver.poll() == KVPoll.Failed, seconds=10)
        with pytest.raises(TransferFailed, match="no encode server answered at 127.0.0.3"):
            receiver.failure_exception()
