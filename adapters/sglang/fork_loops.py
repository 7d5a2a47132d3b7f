"""A re-creation of the SGLang fork's scheduler queues (sglang PR #12665, branch vl-dis-1030,
commit cca20b094), written from reading its code, that drives ``embxfer.adapters.sglang``
with the fork's call sites as they are (the drop-in tests and ``embxfer demo --fork`` run it).

Files re-created: ``disaggregation/multimodal_language.py`` (prealloc and transfer queues),
``disaggregation/multimodal_embedding.py`` (bootstrap and inflight queues, the batch result
and ``send_embedding_chunk``), ``disaggregation/utils.py`` (``poll_and_all_reduce``,
``prepare_abort``) and the parts of ``managers/scheduler.py`` that build the queues and
``abort_request``.  Only what the transfer touches is here (no model, no radix cache, no
HTTP): a "forward" on the encode side hands over a request's precomputed embedding, and a
"prefill" on the language side records what the model would have been given.

The one line the fork would change is ``get_kv_class``: it maps the transfer backend to
embxfer's classes.  Everything that calls the sender, receiver, allocator and buffers is
the fork's sequence, keywords included, and so are its quirks (the language prealloc loop
stops at the first failed alloc, the encode one skips; only the first Transferring is
handled; the language side never clears a receiver).
"""

from __future__ import annotations

import enum
import os
from types import SimpleNamespace
from typing import Any

import torch

from embxfer.adapters import sglang as embxfer_sglang

KVPoll = embxfer_sglang.KVPoll
FAKE_BOOTSTRAP_HOST = "2.2.2.2"


class DisaggregationMode(enum.Enum):
    ENCODE = "encode"
    LANGUAGE = "language"


class KVClassType(enum.Enum):
    MANAGER = "manager"
    SENDER = "sender"
    RECEIVER = "receiver"


def get_kv_class(manager_class: Any, class_type: KVClassType) -> Any:
    """The fork's class lookup, pointed at embxfer (the one line the fork changes)."""
    return {
        KVClassType.MANAGER: manager_class,
        KVClassType.SENDER: embxfer_sglang.EmbeddingSender,
        KVClassType.RECEIVER: embxfer_sglang.EmbeddingReceiver,
    }[class_type]


class FINISH_ABORT:
    def __init__(self, message: str, status_code: Any = None) -> None:
        self.message = message
        self.status_code = status_code


class Req:
    """The fields of the fork's ``Req`` the queues touch."""

    def __init__(self, rid: str, bootstrap_room: int, bootstrap_host: str, origin_input_ids: list[int],
                 data_parallel_rank: int | None = None) -> None:
        self.rid = rid
        self.bootstrap_room = bootstrap_room
        self.bootstrap_host = bootstrap_host
        self.origin_input_ids = list(origin_input_ids)
        self.data_parallel_rank = data_parallel_rank
        self.return_logprob = False
        self.finished_reason: Any = None
        self.embedding_indices: Any = []
        self.metadata_block_indices: Any = None
        # encode side
        self.fill_ids: list[int] = []
        self.embedding: torch.Tensor | None = None
        self.multimodal_inputs: Any = None
        self.disagg_embedding_sender: Any = None
        # language side
        self.input_embeds: torch.Tensor | None = None


def prepare_abort(req: Req, error_message: str, status_code: Any = None) -> None:
    req.finished_reason = FINISH_ABORT(error_message, status_code)


def poll_and_all_reduce(pollers: list[Any], group: "TpGroup") -> list[int]:
    """Each poller's poll, MIN-reduced across the tensor-parallel ranks of ``group``."""
    return [min(int(p.poll()) for p in group.same_request(poller)) for poller in pollers]


def init_data_manager(buffers: Any, scheduler: Any, mode: DisaggregationMode, manager_class: Any) -> Any:
    """Both queues' ``_init_data_manager``: the buffers' pointers go to the manager in kv_args."""
    kv_args = SimpleNamespace(engine_rank=scheduler.tp_rank)
    kv_args.aux_data_ptrs, kv_args.aux_data_lens, kv_args.aux_item_lens = buffers.get_buf_infos()
    return get_kv_class(manager_class, KVClassType.MANAGER)(kv_args, mode, scheduler.server_args)


def metadata_pool(server_args: Any) -> tuple[Any, Any]:
    """The scheduler's ``init_disaggregation``: the block allocator and the buffers, sized
    from the fork's environment variables."""
    buffer_size = int(os.environ.get("SGLANG_EMBEDDING_CACHE_BUFFER_SIZE", "64"))
    block_size = int(os.environ.get("SGLANG_EMBEDDING_CACHE_BLOCK_SIZE", "8192"))
    allocator = embxfer_sglang.ReqToMetadataBlockAllocator(buffer_size, block_size=block_size)
    buffers = embxfer_sglang.MultimodalDataBuffers(buffer_size, block_size, server_args.hidden_size,
                                                   num_deepstack_embeddings=0)
    return allocator, buffers


def abort_with_its_failure(req: Req, poller: Any, what: str) -> None:
    """The fork's Failed branch: the poller's ``failure_exception`` joins the abort message
    (the fork catches every exception there)."""
    message = f"{what} failed for {req.rid=} {req.bootstrap_room=}"
    try:
        poller.failure_exception()
    except Exception as error:
        message += f" with exception {error}"
    prepare_abort(req, message, status_code=500)


class TpGroup:
    """The ranks of one server, run in lock step in one thread: the all-reduce of a request's
    poll takes the minimum over the rank objects of the same request."""

    def __init__(self) -> None:
        self.by_room: dict[int, list[Any]] = {}

    def join(self, room: int, poller: Any) -> None:
        self.by_room.setdefault(room, []).append(poller)

    def same_request(self, poller: Any) -> list[Any]:
        return self.by_room.get(poller.bootstrap_room, [poller])


# -- language side (multimodal_language.py) -----------------------------------------------
class MultimodalLanguageRequest:
    def __init__(self, req: Req, embedding_receiver: Any) -> None:
        self.req = req
        self.embedding_receiver = embedding_receiver
        self.waiting_for_input = False
        self.embedding_indices: Any = None
        self.partial_input_embeds: torch.Tensor | None = None
        self.partial_mrope_positions: torch.Tensor | None = None
        self.partial_fill_ids: list[int] | None = None
        self.partial_sent_tokens: int | None = None
        self.partial_aux_datas: torch.Tensor | None = None


class _FirstQueue:
    """What the queues that meet a request first share: the pool, the manager, the group."""

    mode: DisaggregationMode

    def __init__(self, allocator: Any, buffers: Any, scheduler: Any, manager_class: Any) -> None:
        self.allocator = allocator
        self.metadata_buffers = buffers
        self.scheduler = scheduler
        self.tp_rank = scheduler.tp_rank
        self.gloo_group = scheduler.group
        self.bootstrap_port = scheduler.server_args.disaggregation_bootstrap_port
        self.data_manager = init_data_manager(buffers, scheduler, self.mode, manager_class)


class LanguagePreallocQueue(_FirstQueue):
    mode = DisaggregationMode.LANGUAGE

    def __init__(self, allocator: Any, buffers: Any, scheduler: "LanguageScheduler", manager_class: Any) -> None:
        super().__init__(allocator, buffers, scheduler, manager_class)
        self.default_allocate_tokens = int(os.getenv("SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE", "8192"))
        self.queue: list[MultimodalLanguageRequest] = []

    def add(self, req: Req) -> None:
        receiver = get_kv_class(None, KVClassType.RECEIVER)(
            mgr=self.data_manager, bootstrap_addr=f"{req.bootstrap_host}:{self.bootstrap_port}",
            bootstrap_room=req.bootstrap_room, prefill_dp_rank=req.data_parallel_rank)
        self.gloo_group.join(req.bootstrap_room, receiver)
        self.queue.append(MultimodalLanguageRequest(req=req, embedding_receiver=receiver))

    def pop_preallocated(self) -> list[MultimodalLanguageRequest]:
        self._update_handshake_waiters()
        removed: set[int] = set()
        for i, r in enumerate(self.queue):
            if isinstance(r.req.finished_reason, FINISH_ABORT):
                self.scheduler.stream_output([r.req])
                removed.add(i)
        ready = []
        for i, r in enumerate(self.queue):
            if i in removed or not r.waiting_for_input:
                continue
            if self.allocator.available_size() <= 0:
                break
            r.embedding_indices = self.allocator.alloc(num_tokens=self.default_allocate_tokens, req_id=r.req.rid,
                                                       fake=False)
            if r.embedding_indices is None:
                break
            allocated_tokens = len(r.embedding_indices) * self.metadata_buffers.block_size
            r.embedding_receiver.init(embedding_indices=r.embedding_indices, allocated_tokens=allocated_tokens)
            ready.append(r)
            removed.add(i)
        self.queue = [r for i, r in enumerate(self.queue) if i not in removed]
        return ready

    def _update_handshake_waiters(self) -> None:
        if not self.queue or all(r.waiting_for_input for r in self.queue):
            return
        polls = poll_and_all_reduce([r.embedding_receiver for r in self.queue], self.gloo_group)
        for r, poll in zip(self.queue, polls):
            if poll == KVPoll.Bootstrapping:
                pass
            elif poll == KVPoll.WaitingForInput:
                r.waiting_for_input = True
            elif poll == KVPoll.Failed:
                abort_with_its_failure(r.req, r.embedding_receiver, "handshake")


class LanguageTransferQueue:
    def __init__(self, allocator: Any, buffers: Any, scheduler: "LanguageScheduler") -> None:
        self.allocator = allocator
        self.metadata_buffers = buffers
        self.scheduler = scheduler
        self.gloo_group = scheduler.group
        self.queue: list[MultimodalLanguageRequest] = []

    def extend(self, requests: list[MultimodalLanguageRequest]) -> None:
        self.queue.extend(requests)

    def _handle_failed_request(self, r: MultimodalLanguageRequest) -> None:
        abort_with_its_failure(r.req, r.embedding_receiver, "transfer")
        self.scheduler.stream_output([r.req])
        self.allocator.free(block_indices=r.embedding_indices, req_id=r.req.rid, fake=False)

    def pop_transferred(self) -> list[Req]:
        if not self.queue:
            return []
        polls = poll_and_all_reduce([r.embedding_receiver for r in self.queue], self.gloo_group)
        done, removed = [], set()
        for i, (r, poll) in enumerate(zip(self.queue, polls)):
            if poll == KVPoll.Failed:
                self._handle_failed_request(r)
                removed.add(i)
            elif poll == KVPoll.Success:
                if r.partial_input_embeds is not None:
                    assert r.partial_aux_datas is not None and r.partial_sent_tokens is not None
                    assert r.partial_mrope_positions is not None
                    actual_total_length = int(r.partial_aux_datas[0].item()) - r.partial_sent_tokens
                    embeds, fill_ids, mrope, aux, _ = self.metadata_buffers.get_buf(
                        block_indices=r.embedding_indices, actual_total_length=actual_total_length)
                    embeds = torch.cat([r.partial_input_embeds, embeds])
                    fill_ids = torch.cat([torch.tensor(r.partial_fill_ids), fill_ids])
                    mrope = torch.cat([r.partial_mrope_positions, mrope], dim=-1)
                    aux = r.partial_aux_datas.clone()
                else:
                    embeds, fill_ids, mrope, aux, _ = self.metadata_buffers.get_buf(block_indices=r.embedding_indices)
                embedding_length = int(aux[0])
                mrope_position_delta = aux[1]
                original_length = len(r.req.origin_input_ids)
                r.req.origin_input_ids = fill_ids.tolist()
                r.req.input_embeds = embeds
                if original_length == embedding_length:
                    mm_inputs = None
                elif original_length < embedding_length:
                    mm_inputs = SimpleNamespace(
                        mrope_positions=mrope,
                        mrope_position_delta=torch.tensor([mrope_position_delta]).unsqueeze(1))
                else:
                    self._handle_failed_request(r)
                    removed.add(i)
                    continue
                r.req.multimodal_inputs = mm_inputs
                r.req.embedding_indices = r.embedding_indices  # freed after the prefill forward
                done.append(r.req)
                removed.add(i)
            elif poll == KVPoll.Transferring:
                if r.partial_input_embeds is None:  # the first time only
                    embeds, fill_ids, mrope, aux, _ = self.metadata_buffers.get_buf(block_indices=r.embedding_indices)
                    actual_total_length = int(aux[0])
                    sent_tokens = len(fill_ids)
                    if actual_total_length > sent_tokens:
                        new_allocation = self.allocator.alloc(num_tokens=actual_total_length - sent_tokens,
                                                              req_id=r.req.rid, fake=False)
                        if new_allocation is None:
                            continue  # retried next time, still holding the first blocks
                        r.partial_input_embeds = embeds.clone()
                        r.partial_mrope_positions = mrope.clone()
                        r.partial_aux_datas = aux.clone()
                        r.partial_sent_tokens = sent_tokens
                        r.partial_fill_ids = fill_ids.tolist()
                        self.allocator.free(block_indices=r.embedding_indices, req_id=r.req.rid, fake=False)
                        r.embedding_indices = new_allocation
                        allocated_tokens = len(new_allocation) * self.metadata_buffers.block_size
                        r.embedding_receiver.resume_transfer(embedding_indices=new_allocation,
                                                             sent_tokens=sent_tokens,
                                                             allocated_tokens=allocated_tokens)
            elif poll in (KVPoll.Bootstrapping, KVPoll.WaitingForInput):
                pass
            else:
                raise ValueError(f"Unexpected poll case: {poll}")
        self.queue = [r for i, r in enumerate(self.queue) if i not in removed]
        return done


class LanguageScheduler:
    """One language rank: its pool, its queues, and the part of its event loop they use."""

    def __init__(self, manager_class: Any, server_args: Any, tp_rank: int = 0, group: TpGroup | None = None) -> None:
        self.tp_rank = tp_rank
        self.server_args = server_args
        self.group = group or TpGroup()
        self.req_to_metadata_buffer_idx_allocator, self.disagg_metadata_buffers = metadata_pool(server_args)
        self.transfer_queue = LanguageTransferQueue(
            self.req_to_metadata_buffer_idx_allocator, self.disagg_metadata_buffers, self)
        self.prealloc_queue = LanguagePreallocQueue(
            self.req_to_metadata_buffer_idx_allocator, self.disagg_metadata_buffers, self, manager_class)
        self.waiting_queue: list[Req] = []
        self.prefilled: dict[str, Req] = {}  # what the model was given, by rid
        self.streamed: list[Req] = []  # requests that ended with an abort

    def add(self, req: Req) -> None:
        self.prealloc_queue.add(req)

    def stream_output(self, reqs: list[Req]) -> None:
        self.streamed.extend(reqs)

    def step(self) -> None:
        self.transfer_queue.extend(self.prealloc_queue.pop_preallocated())
        self.waiting_queue.extend(self.transfer_queue.pop_transferred())
        # the prefill forward, then its batch result frees the embedding blocks
        for req in self.waiting_queue:
            self.prefilled[req.rid] = req
            if req.embedding_indices is not None:
                self.req_to_metadata_buffer_idx_allocator.free_with_req(req)
        self.waiting_queue = []

    def abort_request(self, rid: str) -> None:
        for req in list(self.waiting_queue):
            if req.rid.startswith(rid):
                self.waiting_queue.remove(req)
                if req.embedding_indices is not None:
                    self.req_to_metadata_buffer_idx_allocator.free_with_req(req)
        for queue in (self.prealloc_queue.queue, self.transfer_queue.queue):
            for language_req in queue:
                if language_req.req.rid.startswith(rid) and hasattr(language_req.embedding_receiver, "abort"):
                    language_req.embedding_receiver.abort()

    def pending(self) -> int:
        return len(self.prealloc_queue.queue) + len(self.transfer_queue.queue) + len(self.waiting_queue)


# -- encode side (multimodal_embedding.py) ------------------------------------------------
class EncodeBootstrapQueue(_FirstQueue):
    mode = DisaggregationMode.ENCODE

    def __init__(self, allocator: Any, buffers: Any, scheduler: "EncodeScheduler", manager_class: Any) -> None:
        super().__init__(allocator, buffers, scheduler, manager_class)
        self.queue: list[Req] = []

    def add(self, req: Req) -> None:
        req.disagg_embedding_sender = get_kv_class(None, KVClassType.SENDER)(
            mgr=self.data_manager, bootstrap_addr=f"{req.bootstrap_host}:{self.bootstrap_port}",
            bootstrap_room=req.bootstrap_room, dest_tp_ranks=[self.tp_rank], pp_rank=0)
        self.gloo_group.join(req.bootstrap_room, req.disagg_embedding_sender)
        self.queue.append(req)

    def pop_bootstrapped(self) -> list[Req]:
        if not self.queue:
            return []
        polls = poll_and_all_reduce([req.disagg_embedding_sender for req in self.queue], self.gloo_group)
        bootstrapped, removed = [], set()
        for i, (req, poll) in enumerate(zip(self.queue, polls)):
            if poll == KVPoll.Bootstrapping:
                continue
            if poll == KVPoll.Failed:
                abort_with_its_failure(req, req.disagg_embedding_sender, "bootstrap")
                self.scheduler.stream_output([req])
                removed.add(i)
                continue
            indices = self.allocator.alloc(num_tokens=len(req.origin_input_ids), req_id=req.rid, fake=False)
            if indices is None:
                continue  # the encode side skips to the next request (the language side stops)
            req.embedding_indices = indices
            req.disagg_embedding_sender.init(embedding_indices=req.embedding_indices)
            bootstrapped.append(req)
            removed.add(i)
        self.queue = [req for i, req in enumerate(self.queue) if i not in removed]
        return bootstrapped


class EncodeScheduler:
    """One encode rank: its pool, its queues, the forward (precomputed) and its batch result."""

    def __init__(self, manager_class: Any, server_args: Any, embeddings: dict[int, Any], tp_rank: int = 0,
                 group: TpGroup | None = None) -> None:
        self.tp_rank = tp_rank
        self.server_args = server_args
        self.group = group or TpGroup()
        self.embeddings = embeddings  # room -> (embedding, fill_ids, mrope (3, n), delta): the "model"
        self.req_to_metadata_buffer_idx_allocator, self.disagg_metadata_buffers = metadata_pool(server_args)
        self.bootstrap_queue = EncodeBootstrapQueue(
            self.req_to_metadata_buffer_idx_allocator, self.disagg_metadata_buffers, self, manager_class)
        self.waiting_queue: list[Req] = []
        self.inflight_queue: list[Req] = []
        self.streamed: list[Req] = []
        self.done: list[Req] = []

    def add(self, req: Req) -> None:
        self.bootstrap_queue.add(req)

    def stream_output(self, reqs: list[Req]) -> None:
        self.streamed.extend(reqs)

    def step(self) -> None:
        self.waiting_queue.extend(self.bootstrap_queue.pop_bootstrapped())
        batch, self.waiting_queue = self.waiting_queue, []
        for req in batch:  # the forward, then process_batch_result_disagg_multimodal_embedding
            embedding, fill_ids, mrope, delta = self.embeddings[req.bootstrap_room]
            req.embedding = embedding
            req.fill_ids = list(fill_ids)
            req.multimodal_inputs = SimpleNamespace(mrope_positions=mrope,
                                                    mrope_position_delta=torch.tensor([[delta]]))
            self.inflight_queue.append(req)
            self.send_embedding_chunk(req, last_chunk=True)
        if self.inflight_queue:
            self.process_inflight_queue()

    def send_embedding_chunk(self, req: Req, last_chunk: bool = False) -> None:
        assert last_chunk
        self.disagg_metadata_buffers.set_buf(req)
        req.disagg_embedding_sender.send_embedding(
            embedding_indices=req.embedding_indices, last_chunk=last_chunk, total_tokens=len(req.fill_ids),
            block_size=self.disagg_metadata_buffers.block_size)

    def process_inflight_queue(self) -> None:
        polls = poll_and_all_reduce([r.disagg_embedding_sender for r in self.inflight_queue], self.group)
        undone, done = [], []
        for req, poll in zip(self.inflight_queue, polls):
            if poll in (KVPoll.WaitingForInput, KVPoll.Transferring):
                undone.append(req)
            elif poll == KVPoll.Success:
                if hasattr(req.disagg_embedding_sender, "clear"):
                    req.disagg_embedding_sender.clear()
                done.append(req)
            elif poll == KVPoll.Failed:
                abort_with_its_failure(req, req.disagg_embedding_sender, "transfer")
                done.append(req)
            # Bootstrapping: no branch (the fork drops such a request from the queue)
        for req in done:
            self.req_to_metadata_buffer_idx_allocator.free(block_indices=req.embedding_indices, req_id=req.rid,
                                                             fake=False)
            req.embedding_indices = None
        self.done.extend(done)
        self.inflight_queue = undone

    def abort_request(self, rid: str) -> None:
        for queue in (self.bootstrap_queue.queue, self.inflight_queue):
            for req in queue:
                if req.rid.startswith(rid) and hasattr(req.disagg_embedding_sender, "abort"):
                    req.disagg_embedding_sender.abort()

    def pending(self) -> int:
        return len(self.bootstrap_queue.queue) + len(self.waiting_queue) + len(self.inflight_queue)
