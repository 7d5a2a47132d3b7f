"""Mooncake's TCP ports: the range an operator pins with ``MC_MIN_RPC_PORT`` /
``MC_MAX_RPC_PORT``, and telling "its ports are busy" from other start-up failures.

Facts this is built on (measured with mooncake-transfer-engine-non-cuda 0.3.13):
* in P2P handshake mode one engine binds *two* ports of the range, its RPC/handshake port
  and its TCP data port, both without SO_REUSEADDR;
* after a process on those ports exits, the kernel may hold them for up to 60 s (TIME_WAIT
  of the handshake connection, FIN_WAIT of a data connection a live peer never closed), so
  a restart within a two-port range fails until then; four ports per process avoid it;
* a range inside 32768-60999 (the ephemeral ports) is ignored: Mooncake silently falls back
  to 15000-17000;
* whether the ports are busy is found the way Mooncake looks for them, by binding each
  port of the range (its own log lines are hidden unless --verbose).
"""

from __future__ import annotations

import os
import socket

PORTS_PER_ENGINE = 2
EPHEMERAL = (32768, 60999)
def pinned_range(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> tuple[int, int] | None:
    """(min, max) when the operator pinned Mooncake's ports, else None."""
    low, high = environ.get("MC_MIN_RPC_PORT"), environ.get("MC_MAX_RPC_PORT")
    if low is None or high is None:
        return None
    try:
        return int(low), int(high)
    except ValueError:
        return None


def range_problem(ports: tuple[int, int]) -> str | None:
    """Why a pinned range can never work (or is silently ignored); None when it is usable."""
    low, high = ports
    name = f"MC_MIN_RPC_PORT..MC_MAX_RPC_PORT = {low}..{high}"
    if not 1024 <= low <= high <= 65535:
        return f"{name} is not a range of ports between 1024 and 65535"
    if high - low + 1 < PORTS_PER_ENGINE:
        return (f"{name} has {high - low + 1} port; a Mooncake engine binds {PORTS_PER_ENGINE} "
                f"(RPC and data): give each process at least 4")
    if low <= EPHEMERAL[1] and high >= EPHEMERAL[0]:
        return (f"{name} overlaps the ephemeral ports {EPHEMERAL[0]}-{EPHEMERAL[1]}, which Mooncake ignores "
                f"(it falls back to 15000-17000): pick a range outside them")
    return None


def free_ports(ports: tuple[int, int]) -> int:
    """How many ports of the range one could bind now (as Mooncake does: no SO_REUSEADDR,
    so a port the kernel still holds in TIME_WAIT counts as busy)."""
    free = 0
    for port in range(ports[0], ports[1] + 1):
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            free += 1
    return free


def ports_busy_message(ports: tuple[int, int] | None, waited: float) -> str:
    where = (f"in MC_MIN_RPC_PORT..MC_MAX_RPC_PORT = {ports[0]}..{ports[1]}" if ports is not None
             else "in its default range 15000-17000")
    return (f"Mooncake could not bind its {PORTS_PER_ENGINE} TCP ports (RPC and data) {where} within {waited:.0f} s: "
            f"they are in use by another engine, or held by the kernel for up to 60 s after a previous "
            f"process on them exited (TIME_WAIT / FIN_WAIT). Widen the range to at least 4 ports per process, "
            f"or wait 60 s before restarting")
