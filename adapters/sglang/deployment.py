"""Encode servers and language ranks running the fork's re-created queue loops in one
process, over the loopback or real wires: what the drop-in tests and ``embxfer demo --fork``
drive.  Each scheduler is built as the fork builds it, reading the fork's environment
variables (set here for each, as each process would have its own)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch

from ._manager import ForkLoopback, LoopbackEmbeddingManager
from ._wires import EmbeddingManager
from .fork_loops import EncodeScheduler, LanguageScheduler, Req, TpGroup

ENCODE_HOSTS = ("127.0.0.1", "127.0.0.2")  # encode servers: one port, several loopback addresses
LOOPBACK_PORT = 8998
Rows = tuple[torch.Tensor, list[int], torch.Tensor, int]


def embedding_of(room: int, tokens: int, hidden: int) -> Rows:
    """A request's rows, as the encode model would make them: (embedding, fill ids, mrope (3, n), delta)."""
    generator = torch.Generator().manual_seed(room)
    embedding = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    fill_ids = torch.randint(0, 150_000, (tokens,), generator=generator).tolist()
    mrope = torch.randint(0, 1 << 20, (3, tokens), generator=generator, dtype=torch.int32)
    return embedding, fill_ids, mrope, random.Random(room).randint(-5000, 5000)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ForkDeployment:
    def __init__(self, transport: str = "loopback", *, encoders: int = 1, language_tp: int = 1, block_size: int = 128,
                 encode_blocks: int = 512, language_blocks: int = 32, first_tokens: int = 1024,
                 hidden_size: int = 16) -> None:
        if transport not in ("loopback", "wires"):
            raise ValueError(f"transport must be loopback or wires, got {transport!r}")
        self.transport = transport
        self.hidden_size = hidden_size
        self.world = ForkLoopback()
        self.port = LOOPBACK_PORT if transport == "loopback" else free_port()
        manager = LoopbackEmbeddingManager if transport == "loopback" else EmbeddingManager
        self.data: dict[int, Rows] = {}
        self.encoders: dict[str, EncodeScheduler] = {}
        self.language: list[LanguageScheduler] = []
        try:
            with environment(SGLANG_EMBEDDING_CACHE_BLOCK_SIZE=str(block_size),
                             SGLANG_EMBEDDING_CACHE_BUFFER_SIZE=str(encode_blocks)):
                for host in ENCODE_HOSTS[:encoders]:
                    self.encoders[host] = EncodeScheduler(manager, self._server_args(host, 1), self.data)
            with environment(SGLANG_EMBEDDING_CACHE_BLOCK_SIZE=str(block_size),
                             SGLANG_EMBEDDING_CACHE_BUFFER_SIZE=str(language_blocks),
                             SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE=str(first_tokens)):
                group = TpGroup()
                for rank in range(language_tp):
                    self.language.append(
                        LanguageScheduler(manager, self._server_args("127.0.0.1", language_tp), rank, group))
        except BaseException:
            self.close()
            raise
        self.language_blocks, self.encode_blocks = language_blocks, encode_blocks

    def _server_args(self, host: str, tp_size: int) -> SimpleNamespace:
        return SimpleNamespace(host=host, disaggregation_bootstrap_port=self.port, tp_size=tp_size, dp_size=1,
                               hidden_size=self.hidden_size, embxfer_loopback=self.world)

    def managers(self) -> list[Any]:
        return [s.bootstrap_queue.data_manager for s in self.encoders.values()] + [
            s.prealloc_queue.data_manager for s in self.language]

    def close(self) -> None:
        for manager in self.managers():
            if hasattr(manager, "close"):
                manager.close()

    def __enter__(self) -> "ForkDeployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def settle(self) -> None:
        """Let the network carry what is in flight (one scheduler iteration's worth)."""
        if self.transport == "loopback":
            self.world.run_until_idle()
        else:
            time.sleep(0.001)  # the schedulers' loop pace; the I/O threads run meanwhile

    def request(self, room: int, tokens: int, host: str = ENCODE_HOSTS[0], prompt: int = 10) -> None:
        """A client request: to the encode server ``host`` and to every language rank."""
        self.data[room] = embedding_of(room, tokens, self.hidden_size)
        self.encoders[host].add(Req(f"r{room}", room, host, list(range(tokens))))
        for scheduler in self.language:
            scheduler.add(Req(f"r{room}", room, host, list(range(prompt))))

    def run(self, seconds: float = 60.0, until: Callable[[], bool] | None = None) -> None:
        schedulers: list[Any] = [*self.encoders.values(), *self.language]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for scheduler in schedulers:
                scheduler.step()
            self.settle()
            if until is not None and until():
                return
            if until is None and not any(s.pending() for s in schedulers):
                return
        raise TimeoutError(f"still pending after {seconds} s: {[s.pending() for s in schedulers]}")

    def exact(self, room: int) -> bool:
        """Every language rank prefilled ``room`` with exactly the rows the encode side made."""
        embedding, fill_ids, mrope, delta = self.data[room]
        for scheduler in self.language:
            req = scheduler.prefilled.get(f"r{room}")
            if req is None or req.finished_reason is not None or req.input_embeds is None:
                return False
            mm = req.multimodal_inputs
            if not (req.input_embeds.dtype == embedding.dtype and torch.equal(req.input_embeds, embedding)
                    and req.origin_input_ids == fill_ids and mm is not None
                    and torch.equal(mm.mrope_positions.to(torch.int64), mrope.to(torch.int64))
                    and mm.mrope_position_delta.tolist() == [[delta]]):
                return False
        return True

    def leftovers(self) -> dict[str, Any]:
        """What is not back where it belongs (empty when every block and record is)."""
        found: dict[str, Any] = {}
        for rank, scheduler in enumerate(self.language):
            allocator = scheduler.req_to_metadata_buffer_idx_allocator
            if allocator.available_size() != self.language_blocks:
                found[f"language{rank} blocks held"] = self.language_blocks - allocator.available_size()
            if allocator.double_frees:
                found[f"language{rank} double frees"] = allocator.double_frees
            if scheduler.prealloc_queue.data_manager.rooms():
                found[f"language{rank} records"] = scheduler.prealloc_queue.data_manager.rooms()
        for host, encoder in self.encoders.items():
            manager = encoder.bootstrap_queue.data_manager
            if encoder.req_to_metadata_buffer_idx_allocator.available_size() != self.encode_blocks:
                found[f"encode {host} blocks held"] = True
            if manager.rooms():
                found[f"encode {host} records"] = manager.rooms()
            if manager.sender_link().sources_held():
                found[f"encode {host} sources"] = manager.sender_link().sources_held()
        if self.world.violations():
            found["violations"] = self.world.violations()
        return found

    def aborted(self, room: int) -> list[str]:
        """The abort messages every side gave ``room``."""
        messages = []
        schedulers: list[Any] = [*self.encoders.values(), *self.language]
        for scheduler in schedulers:
            messages += [r.finished_reason.message for r in scheduler.streamed if r.bootstrap_room == room]
            if isinstance(scheduler, EncodeScheduler):
                messages += [r.finished_reason.message for r in scheduler.done
                             if r.bootstrap_room == room and r.finished_reason is not None]
        return messages


def run_fork_demo(transport: str = "loopback", requests: int = 24, seed: int = 1) -> dict[str, Any]:
    """Mixed requests from two encode servers into one language pool through the fork's loops."""
    rng = random.Random(seed)
    started = time.monotonic()
    with ForkDeployment(transport, encoders=2, language_blocks=32) as deployment:
        lengths = {room: rng.choice([256, 700, 1024, 2000, rng.randint(100, 6000)]) for room in range(1, requests + 1)}
        for room, tokens in lengths.items():
            deployment.request(room, tokens, host=ENCODE_HOSTS[room % 2])
        deployment.run()
        exact = sum(deployment.exact(room) for room in lengths)
        return {
            "transport": transport, "requests": requests, "exact": exact, "tokens": sum(lengths.values()),
            "seconds": round(time.monotonic() - started, 3), "leftovers": deployment.leftovers(),
            "ok": exact == requests and not deployment.leftovers(),
        }
