"""Drop-in for the SGLang fork's embedding transfer (sglang PR #12665, branch vl-dis-1030).

The fork's scheduler code runs unchanged over these classes: its queues build
``EmbeddingSender(mgr, bootstrap_addr, bootstrap_room, dest_tp_ranks, pp_rank)`` and
``EmbeddingReceiver(mgr, bootstrap_addr, bootstrap_room, prefill_dp_rank)`` and call
``init``/``send_embedding``/``resume_transfer``/``poll``/``failure_exception``/``abort``/
``clear`` with its own keywords; it allocates blocks from ``ReqToMetadataBlockAllocator``
and reads rows with ``MultimodalDataBuffers.get_buf``, which here are embxfer's pool (so
embxfer can fence reuse of blocks a sender may still write).  The managers take the fork's
``(kv_args, disaggregation_mode, server_args)``.  See the README's SGLang section for what
each call does.
"""

from ._manager import ForkLoopback, LoopbackEmbeddingManager, ManagerBase, mode_name
from ._wires import EmbeddingManager
from ._objects import EmbeddingReceiver, EmbeddingSender, KVPoll, TransferFailed
from ._pool import MultimodalDataBuffers, ReqToMetadataBlockAllocator

__all__ = [
    "EmbeddingSender", "EmbeddingReceiver", "KVPoll", "TransferFailed",
    "MultimodalDataBuffers", "ReqToMetadataBlockAllocator",
    "EmbeddingManager", "LoopbackEmbeddingManager", "ForkLoopback", "ManagerBase", "mode_name",
]
