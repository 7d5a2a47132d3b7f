"""Message schemas: field order, wire kind and tag of every control-plane message.

Rules:
* A message is a tagged, versioned multipart frame: frame 0 is ``MAGIC + version + tag``;
  frame 1 packs the fixed-width fields (big-endian) in schema order; then one frame per
  ``str`` field (UTF-8, at most ``MAX_STR_BYTES``); then one frame per ``bytes`` field
  (opaque, at most ``MAX_BYTES_FIELD``); then one frame per ``extents`` field (pairs of u32
  ``start_block, block_count``).
* Kinds: ``u32`` 0..2**32-1, ``u64`` 0..2**63-1 (room ids are SGLang's non-negative
  int64), ``i64`` signed, ``str``, ``bytes``, ``extents``.
* Tags are never reused; a new field means a new protocol version.
The attrs classes in ``embxfer.core`` must have exactly these fields in this order (a test
checks it); the native codec is driven by this table.
"""

from __future__ import annotations

from typing import Final

MAGIC: Final = b"EMBX"
# 2: Register names its data plane; 3: a multipart may carry several messages; 4: PoolLayout
# carries the data plane's metadata (NIXL's agent metadata)
VERSION: Final = 4
MAX_STR_BYTES: Final = 1024
MAX_BYTES_FIELD: Final = 1 << 16  # a NIXL agent's metadata: ~0.5 KiB over TCP, a few KiB with many RDMA NICs
MAX_EXTENTS: Final = 1 << 16

U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 63) - 1  # room ids are SGLang's non-negative int64
I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1

# name -> (tag, ((field, kind), ...))
MESSAGE_SCHEMAS: Final[dict[str, tuple[int, tuple[tuple[str, str], ...]]]] = {
    # receiver -> sender, once per connection: who I am and how my pool is cut
    "Register": (1, (
        ("rank", "u32"), ("required_dst_info_num", "u32"), ("incarnation", "u64"),
        ("block_size", "u32"), ("hidden_size", "u32"),
        ("dtype", "str"), ("endpoint", "str"), ("session_id", "str"), ("data_plane", "str"),
    )),
    # receiver -> sender, round 0: the first allocation
    "Init": (2, (
        ("room", "u64"), ("rank", "u32"), ("required_dst_info_num", "u32"),
        ("block_size", "u32"), ("allocated_tokens", "u32"), ("extents", "extents"),
    )),
    # receiver -> sender, round r >= 1: the next allocation
    "Resume": (3, (
        ("room", "u64"), ("rank", "u32"), ("round", "u32"), ("sent_tokens", "u32"),
        ("allocated_tokens", "u32"), ("extents", "extents"),
    )),
    # sender -> receiver: round `round` is written: `written_tokens` rows from `sent_tokens`
    "Status": (4, (
        ("room", "u64"), ("rank", "u32"), ("round", "u32"), ("sent_tokens", "u32"),
        ("written_tokens", "u32"),
    )),
    # either way: this room is over for the sender of this message
    "Abort": (5, (("room", "u64"), ("rank", "u32"), ("reason", "str"))),
    # either way: the abort was seen; the sender of this ack never writes the room again
    "AbortAck": (6, (("room", "u64"), ("rank", "u32"))),
    # either way: liveness, with the incarnation that tells a restarted peer apart; `rank`
    # is the receiver rank of the link (the sender's heartbeat names its destination)
    "Heartbeat": (7, (("rank", "u32"), ("incarnation", "u64"), ("sequence", "u64"))),
    # receiver -> sender, after Register on a real data plane: where its pool buffers live,
    # and what the data plane needs to reach them (NIXL: the agent metadata; others: empty)
    "PoolLayout": (8, (
        ("rank", "u32"), ("pool_slots", "u32"), ("embeddings_addr", "u64"), ("fill_ids_addr", "u64"),
        ("mrope_addr", "u64"), ("aux_addr", "u64"), ("data_plane_metadata", "bytes"),
    )),
    # sender -> receiver: the answer to Register, with the sender's data-plane session;
    # a refusal says why (e.g. the two sides' block sizes)
    "Registered": (9, (
        ("incarnation", "u64"), ("accepted", "u32"), ("session_id", "str"), ("reason", "str"),
    )),
}

# Several messages to one peer may travel as one multipart, one after another (the control
# plane coalesces what one wake-up has ready for a peer); the reader splits them by each
# header's frame count.  At most this many in one.
MAX_COALESCED: Final = 64

# The aux header written with round 0 into the aux record of the allocation's first block,
# as int64 words in this order.
AUX_FIELDS: Final = ("version", "room", "total_tokens", "mrope_position_delta", "hidden_size", "dtype_code")
AUX_WORDS: Final = len(AUX_FIELDS)
DTYPE_CODES: Final = {"float32": 1, "float16": 2, "bfloat16": 3}

# The SGLang fork's layout: every field an ASCII string frame.
FORK_INIT_FIELDS: Final = (
    "room", "endpoint", "dst_port", "session_id", "embedding_indices_str",
    "required_dst_info_num", "allocated_tokens",
)
FORK_RESUME_FIELDS: Final = (
    "room", "endpoint", "dst_port", "session_id", "embedding_indices_str",
    "required_dst_info_num", "sent_tokens", "allocated_tokens",
)

