"""The protocol-settings command-line flags, defined once: one table of (flag, ``Settings`` field).

The same table adds the flags to a parser (``add_settings_flags``), turns parsed flags into
``Settings`` (``settings_from``) and renders ``Settings`` back into flags for a process this
one spawns (``settings_args``), so a spawned ``serve-encode``/``serve-language`` gets exactly
the settings of its parent, every field included.

A flag left unset (``None``) is not an override: ``Settings.from_env`` then takes the
``EMBXFER_<FIELD>`` variable, or the field's default.  A few flags have a default of their own
(``--pool-blocks``, ``--hidden-size``, ``--dtype``): those always override the environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import attrs

from embxfer.core import Settings

GROUP_TITLE = "protocol settings (must agree on both sides)"


@attrs.frozen
class SettingsFlag:
    """``--flag`` sets ``Settings.<field>``; ``type`` parses its text, ``str`` renders it back."""

    flag: str
    field: str
    type: Callable[[str], Any] = str
    default: Any = None  # None: EMBXFER_<FIELD>, else the Settings default
    choices: tuple[str, ...] | None = None
    help: str | None = None

    def render(self, value: Any) -> str:
        return str(value)  # str(float) is the shortest text that float() reads back exactly


# ``--pool-blocks``' default is add_settings_flags' ``pool_blocks`` argument.
POOL_BLOCKS_DEFAULT = 64

SETTINGS_FLAGS: tuple[SettingsFlag, ...] = (
    SettingsFlag("--block-size", "block_size", int),
    SettingsFlag("--default-blocks", "default_blocks", int),
    SettingsFlag("--pool-blocks", "pool_blocks", int, default=POOL_BLOCKS_DEFAULT),
    SettingsFlag("--hidden-size", "hidden_size", int, default=256),
    SettingsFlag("--dtype", "dtype", default="bfloat16", choices=("float32", "float16", "bfloat16")),
    SettingsFlag("--data-plane", "data_plane", choices=("mooncake", "zmq", "shm", "auto", "nixl"),
                 help="how rows travel: mooncake (default; TCP or RDMA), zmq (zero-copy ZeroMQ frames, "
                      "no Mooncake needed), shm (shared memory, both sides on one host) or auto (shared "
                      "memory to each language process on the same host, Mooncake to the others; "
                      "both sides say auto) or nixl (one NIXL WRITE a round over UCX; "
                      "pip install 'embxfer[nixl]'); "
                      "EMBXFER_DATA_PLANE sets the default"),
    SettingsFlag("--bootstrap-timeout", "bootstrap_timeout", float, help="seconds (EMBXFER_BOOTSTRAP_TIMEOUT)"),
    SettingsFlag("--waiting-timeout", "waiting_timeout", float, help="seconds (EMBXFER_WAITING_TIMEOUT)"),
    SettingsFlag("--transfer-timeout", "transfer_timeout", float, help="seconds (EMBXFER_TRANSFER_TIMEOUT)"),
    SettingsFlag("--quarantine-timeout", "quarantine_timeout", float, help="seconds (EMBXFER_QUARANTINE_TIMEOUT)"),
    SettingsFlag("--heartbeat-interval", "heartbeat_interval", float, help="seconds (EMBXFER_HEARTBEAT_INTERVAL)"),
    SettingsFlag("--heartbeat-misses", "heartbeat_misses", int, help="EMBXFER_HEARTBEAT_MISSES"),
    SettingsFlag("--dead-peer-grace", "dead_peer_grace", float,
                 help="seconds a new room waits for a dead encode server's successor (EMBXFER_DEAD_PEER_GRACE)"),
    SettingsFlag("--retention-timeout", "retention_timeout", float,
                 help="seconds a finished room nobody reads is kept (EMBXFER_RETENTION_TIMEOUT)"),
    SettingsFlag("--admission-timeout", "admission_timeout", float,
                 help="seconds a scheduler-driven request may wait for blocks before its init (EMBXFER_ADMISSION_TIMEOUT)"),
    SettingsFlag("--pool-device", "device",
                 help="where the receiver's pool and results live: cpu (default), cuda or cuda:N; the "
                      "mooncake (a CUDA build) and nixl planes write device memory (EMBXFER_DEVICE)"),
    SettingsFlag("--prealloc", "prealloc", choices=("fixed", "adaptive"),
                 help="a room's first allocation: fixed (default_blocks) or adaptive (EMBXFER_PREALLOC)"),
)


def add_settings_flags(parser: argparse.ArgumentParser, *, pool_blocks: int = POOL_BLOCKS_DEFAULT) -> None:
    group = parser.add_argument_group(GROUP_TITLE)
    for flag in SETTINGS_FLAGS:
        default = pool_blocks if flag.field == "pool_blocks" else flag.default
        extra: dict[str, Any] = {}
        if flag.choices is not None:
            extra["choices"] = list(flag.choices)
        if flag.help is not None:
            extra["help"] = flag.help
        if flag.type is not str:
            extra["type"] = flag.type
        group.add_argument(flag.flag, dest=flag.field, default=default, **extra)


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    """``Settings`` from the parsed flags: a flag left unset falls back to the environment."""
    overrides = {flag.field: getattr(args, flag.field) for flag in SETTINGS_FLAGS}
    return Settings.from_env(**{k: v for k, v in overrides.items() if v is not None}, **extra)


def settings_args(settings: Settings) -> list[str]:
    """Every flag of the table with ``settings``' value: ``settings_from`` of them gives ``settings``."""
    args: list[str] = []
    for flag in SETTINGS_FLAGS:
        args += [flag.flag, flag.render(getattr(settings, flag.field))]
    return args
