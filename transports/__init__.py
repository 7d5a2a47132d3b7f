"""embxfer.transports — data and control planes that carry the core's actions."""

from .buffers import PoolBuffers, torch_dtype
from .loopback import LoopbackNetwork, Packet

__all__ = ["LoopbackNetwork", "Packet", "PoolBuffers", "torch_dtype"]
