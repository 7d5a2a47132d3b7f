"""One settings object for every default; environment overrides are read here only."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

from embxfer.specs.schemas import U32_MAX

from ._errors import SettingsError

DTYPE_NAMES = ("float32", "float16", "bfloat16")
DTYPE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SettingsError(f"{attribute.name} must be a positive integer, got {value!r}", field=attribute.name)


def _wire_count(instance: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    """A positive integer that travels in a u32 wire field (sizes, block counts)."""
    _positive_int(instance, attribute, value)
    if value > U32_MAX:
        raise SettingsError(f"{attribute.name} must be at most {U32_MAX} (a u32 on the wire), got {value}",
                            field=attribute.name)


def _positive_seconds(instance: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise SettingsError(f"{attribute.name} must be a positive number of seconds, got {value!r}", field=attribute.name)


DATA_PLANES = ("mooncake", "zmq", "shm", "auto", "nixl")
PREALLOC_POLICIES = ("fixed", "adaptive")
# str fields and the values each accepts
CHOICES: dict[str, tuple[str, ...]] = {"dtype": DTYPE_NAMES, "data_plane": DATA_PLANES, "prealloc": PREALLOC_POLICIES}


def _one_of(instance: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    choices = CHOICES[attribute.name]
    if value not in choices:
        raise SettingsError(f"{attribute.name} must be one of {', '.join(choices)}, got {value!r}", field=attribute.name)


HOST_MEMORY_PLANES = ("zmq", "shm", "auto")  # planes whose receiver pool must be host memory
_DEVICE = re.compile(r"cpu|cuda(:(0|[1-9][0-9]{0,3}))?")


def _device(instance: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise SettingsError(f"{attribute.name} must be cpu, cuda or cuda:N, got {value!r}", field=attribute.name)


@attrs.frozen
class Settings:
    """Sizes, timeouts and intervals shared by both sides of a link.

    ``block_size`` tokens make a block; the receiver's pool holds ``pool_blocks`` blocks and
    guesses ``default_blocks`` for a new room.  Timeouts are seconds per non-terminal state
    (see ``embxfer.specs.tables.TIMEOUT_SETTING``).
    """

    block_size: int = attrs.field(default=128, validator=_wire_count)
    default_blocks: int = attrs.field(default=8, validator=_wire_count)
    pool_blocks: int = attrs.field(default=64, validator=_wire_count)
    hidden_size: int = attrs.field(default=1024, validator=_wire_count)
    dtype: str = attrs.field(default="bfloat16", validator=_one_of)
    bootstrap_timeout: float = attrs.field(default=30.0, validator=_positive_seconds)
    waiting_timeout: float = attrs.field(default=120.0, validator=_positive_seconds)
    transfer_timeout: float = attrs.field(default=60.0, validator=_positive_seconds)
    # Must exceed bootstrap_timeout + waiting_timeout (plus twice the worst delivery delay):
    # when an abort is lost, the sender's own timers must end its room before the receiver
    # reuses quarantined blocks.  The checker proves it so; __attrs_post_init__ enforces it.
    quarantine_timeout: float = attrs.field(default=180.0, validator=_positive_seconds)
    heartbeat_interval: float = attrs.field(default=1.0, validator=_positive_seconds)
    heartbeat_misses: int = attrs.field(default=5, validator=_positive_int)
    # the data plane of the real transports: Mooncake (RDMA or TCP), zero-copy ZeroMQ frames,
    # shared memory between two processes on one host, or auto: shared memory to each
    # receiver on the same host, Mooncake to the others
    data_plane: str = attrs.field(default="mooncake", validator=_one_of)
    # the first allocation of a room: always ``default_blocks``, or learnt from recent rooms
    prealloc: str = attrs.field(default="fixed", validator=_one_of)
    # while the sender is known dead (silent past the heartbeat limit, no new process has
    # answered), a room still waiting to start fails after this grace instead of waiting
    # its whole bootstrap_timeout
    dead_peer_grace: float = attrs.field(default=2.0, validator=_positive_seconds)
    # a finished room whose outcome nobody reads (take, or failure + clear) is forgotten
    # after this long, its rows released (counted as expired_unread)
    retention_timeout: float = attrs.field(default=600.0, validator=_positive_seconds)
    # a scheduler-driven request (the SGLang fork's) may wait this long for the engine to
    # find it blocks and call init; the wait spends none of its bootstrap_timeout
    admission_timeout: float = attrs.field(default=600.0, validator=_positive_seconds)
    # where the receiver's pool and its results live (torch device names); a sender's rows may
    # be on any device whatever this says
    device: str = attrs.field(default="cpu", validator=_device)

    def __attrs_post_init__(self) -> None:
        if self.default_blocks > self.pool_blocks:
            raise SettingsError(
                f"default_blocks ({self.default_blocks}) must not exceed pool_blocks ({self.pool_blocks})",
                field="default_blocks",
            )
        if self.pool_blocks * self.block_size > U32_MAX:
            raise SettingsError(
                f"pool_blocks x block_size ({self.pool_blocks} x {self.block_size}) must be at most {U32_MAX} slots"
                " (slot numbers are u32 on the wire)", field="pool_blocks",
            )
        if self.device != "cpu" and self.data_plane in HOST_MEMORY_PLANES:
            raise SettingsError(
                f"device {self.device!r}: the {self.data_plane} data plane writes the pool as host memory "
                "(use device cpu, or the mooncake or nixl plane)", field="device",
            )
        minimum = self.bootstrap_timeout + self.waiting_timeout
        if not self.quarantine_timeout > minimum:
            raise SettingsError(
                f"quarantine_timeout ({self.quarantine_timeout:g} s) must exceed bootstrap_timeout + waiting_timeout"
                f" ({self.bootstrap_timeout:g} + {self.waiting_timeout:g} = {minimum:g} s), plus twice the worst"
                " delivery delay: otherwise a lost abort lets a late write land in reused blocks",
                field="quarantine_timeout",
            )

    @classmethod
    def breaking_the_timing_rule(cls, **values: Any) -> "Settings":
        """Settings whose ``quarantine_timeout`` may break the timing rule.  Only for showing
        what breaking it breaks (the checker's ``--quarantine-timeout``); never for serving."""
        quarantine = values.pop("quarantine_timeout")
        settings = cls(**values, quarantine_timeout=1e300)  # every other rule still holds
        _positive_seconds(settings, attrs.fields(cls).quarantine_timeout, quarantine)
        object.__setattr__(settings, "quarantine_timeout", quarantine)  # frozen: set once, here
        return settings

    @property
    def pool_tokens(self) -> int:
        return self.pool_blocks * self.block_size

    @property
    def default_tokens(self) -> int:
        return self.default_blocks * self.block_size

    def timeout_for(self, state: str) -> float:
        from embxfer.specs.tables import TIMEOUT_SETTING

        return float(getattr(self, TIMEOUT_SETTING[state]))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings with ``EMBXFER_<FIELD>`` variables (and the SGLang fork's names) applied.

        ``EMBXFER_*`` wins over an SGLang alias; keyword overrides win over both.  A bad
        value raises ``SettingsError`` naming the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            if field.name in overrides:
                continue  # an override wins: its variables are not even parsed
            names = [f"EMBXFER_{field.name.upper()}", *ENV_ALIASES.get(field.name, ())]
            for name in names:
                if name in env:
                    values[field.name] = _parse_env(name, env[name], field)
                    break
        tokens_name = "SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE"  # the fork's first allocation, in tokens
        if "default_blocks" not in values and "default_blocks" not in overrides and tokens_name in env:
            tokens = _parse_env(tokens_name, env[tokens_name], attrs.fields(cls).default_blocks)
            block_size = overrides.get("block_size", values.get("block_size", attrs.fields(cls).block_size.default))
            values["default_blocks"] = -(-tokens // block_size) if isinstance(block_size, int) and block_size > 0 else tokens
        values.update(overrides)
        try:
            return cls(**values)
        except SettingsError as error:
            # name the variable that set the bad value; a cross-field error (default_blocks >
            # pool_blocks) may come from either field's variable
            for field_name in _RELATED_FIELDS.get(error.field or "", (error.field or "",)):
                if field_name in overrides:
                    continue
                source = next(
                    (n for n in [f"EMBXFER_{field_name.upper()}", *ENV_ALIASES.get(field_name, ()),
                                 *_DERIVED_FROM.get(field_name, ())] if n in env),
                    None,
                )
                if source is not None:
                    raise SettingsError(f"{source}: {error}", field=source) from None
            raise


# The SGLang fork's variable names, accepted as aliases (the PR's names first, then the
# older design notes'). SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE (tokens of the first
# allocation) sets default_blocks = ceil(tokens / block_size), in ``from_env``.
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "block_size": ("SGLANG_EMBEDDING_CACHE_BLOCK_SIZE", "SGLANG_MULTIMODAL_BLOCK_SIZE"),
    "default_blocks": ("SGLANG_DEFAULT_MULTIMODAL_BLOCKS",),
    "pool_blocks": ("SGLANG_EMBEDDING_CACHE_BUFFER_SIZE",),
}


# Variables that set a field indirectly (converted in ``from_env``).
_DERIVED_FROM: dict[str, tuple[str, ...]] = {"default_blocks": ("SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE",)}


# Fields whose variables may be behind a cross-field SettingsError, in the order to blame them.
_RELATED_FIELDS: dict[str, tuple[str, ...]] = {
    "default_blocks": ("default_blocks", "pool_blocks", "block_size"),
    "pool_blocks": ("pool_blocks", "block_size"),
    "quarantine_timeout": ("quarantine_timeout", "bootstrap_timeout", "waiting_timeout"),
    "device": ("device", "data_plane"),
}


def _parse_env(name: str, raw: str, field: attrs.Attribute) -> Any:  # type: ignore[type-arg]
    text = raw.strip()
    if field.type in ("int", int):
        # ASCII decimal digits only: int() would also take "1_000" and non-ASCII digits
        if not (text.isascii() and text.isdigit()):
            raise SettingsError(f"{name} must be a positive integer, got {raw!r}", field=name)
        value: Any = int(text)
        if value <= 0:
            raise SettingsError(f"{name} must be a positive integer, got {raw!r}", field=name)
        return value
    if field.type in ("float", float):
        try:
            seconds = float(text)
        except ValueError:
            raise SettingsError(f"{name} must be a positive number of seconds, got {raw!r}", field=name) from None
        if not seconds > 0 or seconds == float("inf"):
            raise SettingsError(f"{name} must be a positive number of seconds, got {raw!r}", field=name)
        return seconds
    if field.name == "device":
        if not _DEVICE.fullmatch(text):
            raise SettingsError(f"{name} must be cpu, cuda or cuda:N, got {raw!r}", field=name)
        return text
    choices = CHOICES[field.name]
    if text not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}", field=name)
    return text
