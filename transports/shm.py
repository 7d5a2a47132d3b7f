"""Same-host shared-memory data plane: the receiver's pool lives in an anonymous memory file
(``memfd``) and the sender copies each round's rows straight into the room's slots — one
memcpy per extent, no socket.

Why a memfd and not a file in ``/dev/shm``: a memfd has no name in any file system, so a
process killed with -9 leaves nothing behind; its memory goes when the last process holding
it lets go.  The sender opens it through the receiver's ``/proc/<pid>/fd/<fd>`` (the same
host, PID namespace and user, or root), checks that its name carries the receiver's random
token (a reused pid or fd is not ours) and maps it once per receiver; it unmaps a receiver
whose memfd is gone, once no write of its own is copying into it.

A dead writer is dead: its copies stop with its process, so a slot is reused only after
the core's rules (quarantine, peer death) say so, as on every plane.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import threading
from typing import Any

import attrs
import torch

from embxfer.core import Settings
from embxfer.specs.schemas import AUX_WORDS

from .buffers import PoolBuffers, torch_dtype

SCHEME = "shm"
PAGE = mmap.PAGESIZE
# fills the page tables at mmap time: a 64 MB round then takes no page fault in the copy
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class ShmUnavailable(RuntimeError):
    """Shared memory cannot carry rows between these two processes; the message says why."""


def host_identity() -> str:
    """Two processes with the same identity can map each other's memfds: the same boot of
    the same kernel, the same PID namespace, the same user."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError as error:
        raise ShmUnavailable(f"no /proc to tell which host this is ({error}): the shm data plane needs Linux") from None
    return f"{boot_id}.{pid_namespace}.{os.getuid()}"


@attrs.frozen
class ShmSession:
    """What the receiver advertises as its data session: where its pool is and how to check it."""

    identity: str
    pid: int
    fd: int
    token: str
    base: int  # the pool's address in the receiver (the pool layout's addresses are in its space)
    size: int

    def __str__(self) -> str:
        return f"{SCHEME}:{self.identity}:{self.pid}:{self.fd}:{self.token}:{self.base:x}:{self.size}"

    @property
    def memfd_name(self) -> str:
        return f"embxfer-pool-{self.token}"

    @classmethod
    def parse(cls, text: str) -> "ShmSession":
        parts = text.split(":")
        if len(parts) != 7 or parts[0] != SCHEME:
            raise ShmUnavailable(f"{text!r} is not a shared-memory data session (is the receiver on --data-plane shm?)")
        try:
            return cls(parts[1], int(parts[2]), int(parts[3]), parts[4], int(parts[5], 16), int(parts[6]))
        except ValueError:
            raise ShmUnavailable(f"malformed shared-memory data session {text!r}") from None


def _section(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


class SharedPoolBuffers(PoolBuffers):
    """The receiver's pool in a memfd, mapped and pre-faulted; ``session`` tells a sender on
    this host how to map it."""

    def __init__(self, settings: Settings) -> None:  # (PoolBuffers' own __init__ allocates private memory)
        if not hasattr(os, "memfd_create"):
            raise ShmUnavailable("this platform has no memfd_create: the shm data plane needs Linux")
        slots, dtype = settings.pool_tokens, torch_dtype(settings.dtype)
        element = torch.empty((), dtype=dtype).element_size()
        shapes: list[tuple[tuple[int, ...], torch.dtype, int]] = [
            ((slots, settings.hidden_size), dtype, element), ((slots,), torch.int64, 8), ((slots, 3), torch.int64, 8),
            ((settings.pool_blocks, AUX_WORDS), torch.int64, 8),
        ]
        size = sum(_section(_count(shape) * width) for shape, _, width in shapes)
        identity = host_identity()  # (before the memfd: nothing to close if there is no /proc)
        token = secrets.token_hex(8)
        self.fd = os.memfd_create(f"embxfer-pool-{token}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            os.close(self.fd)
            raise
        tensors, offset = [], 0
        for shape, kind, width in shapes:
            tensors.append(torch.frombuffer(self._map, dtype=kind, count=_count(shape), offset=offset).view(shape))
            offset += _section(_count(shape) * width)
        self.block_size = settings.block_size
        self.device, self.pinned = torch.device("cpu"), False  # (a shared mapping: host memory, not pinned)
        self.embeddings, self.fill_ids, self.mrope, self.aux = tensors  # zero: a fresh memfd reads as zeros
        self.session = ShmSession(identity, os.getpid(), self.fd, token, self.embeddings.data_ptr(), size)

    def close(self) -> None:
        """No sender may open the pool from now on (one that mapped it keeps its mapping until it
        unmaps; the memory goes with the last mapping)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for extent in shape:
        count *= extent
    return count


@attrs.define(eq=False)
class _Mapping:
    key: str
    session: ShmSession
    map: mmap.mmap
    anchor: Any  # a ctypes view of the map: its address, and it keeps the map from closing under a copy
    address: int
    writes: int = 0  # copies in progress
    gone: bool = False  # the receiver's memfd is gone: unmap once no copy uses it


class ShmEngine:
    """The sender's side: maps each receiver's pool once and copies extents into it (the
    ``BatchWriter``'s engine, on its worker threads; ``ctypes.memmove`` releases the GIL)."""

    name = "shared-memory copy"
    needs_registration = False  # it reads the caller's tensors wherever they are in this process
    host_memory_only = True  # (a memcpy)
    inline_bytes = 256 << 10  # copied on the I/O thread in ~10 µs: cheaper than a hand-off to a worker
    notes = False

    def __init__(self) -> None:
        self.identity = host_identity()
        self._lock = threading.Lock()
        self._maps: dict[str, _Mapping] = {}

    def register(self, tensor: torch.Tensor) -> None:
        pass

    def unregister(self, tensor: torch.Tensor) -> None:
        pass

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int], note: bytes = b"") -> int:
        mapping = self._acquire(target)
        try:
            base, size, address = mapping.session.base, mapping.session.size, mapping.address
            for source, destination, length in zip(local, remote, lengths):
                offset = destination - base
                if offset < 0 or offset + length > size:
                    raise ShmUnavailable(f"{length} bytes at {destination:#x} lie outside the receiver's pool")
                ctypes.memmove(address + offset, source, length)
        finally:
            self._let_go(mapping)
        return 0

    def learn(self, target: str, layout: Any) -> None:
        """(The session says where the pool is: nothing to learn from the layout.)"""

    def route(self, target: str) -> tuple["ShmEngine", str]:
        return self, target

    def check(self, target: str) -> None:
        """Raise ``ShmUnavailable`` unless ``target``'s pool can be mapped (it stays mapped)."""
        self._let_go(self._acquire(target))

    def is_mapped(self, target: str) -> bool:
        with self._lock:
            return target in self._maps

    def stats(self) -> dict[str, int]:
        return {"pools_mapped": self.mapped()}

    def mapped(self) -> int:
        """Receivers' pools mapped now."""
        with self._lock:
            return len(self._maps)

    def prune(self, closing: bool = False) -> None:
        """Unmap the pools of receivers that are gone (every pool when ``closing``); a pool a
        copy is using is unmapped when that copy ends."""
        with self._lock:
            for mapping in list(self._maps.values()):
                if closing or not _alive(mapping.session):
                    self._drop(mapping)

    def _acquire(self, target: str) -> _Mapping:
        with self._lock:
            mapping = self._maps.get(target)
            if mapping is None:
                mapping = self._maps[target] = self._open(target)
            mapping.writes += 1
            return mapping

    def _let_go(self, mapping: _Mapping) -> None:
        with self._lock:
            mapping.writes -= 1
            if mapping.gone and not mapping.writes:
                self._unmap(mapping)

    def _open(self, target: str) -> _Mapping:
        session = ShmSession.parse(target)
        if session.identity != self.identity:
            raise ShmUnavailable(
                f"the receiver is not on this host (its identity {session.identity}, ours {self.identity}): "
                "use --data-plane mooncake or zmq between hosts"
            )
        path = f"/proc/{session.pid}/fd/{session.fd}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise ShmUnavailable(f"cannot open the receiver's pool at {path}: {error.strerror}") from None
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != f"/memfd:{session.memfd_name} (deleted)":
                raise ShmUnavailable(f"{path} is not the receiver's pool (the process was replaced)")
            if os.fstat(fd).st_size != session.size:
                raise ShmUnavailable(f"the receiver's pool at {path} is not {session.size} bytes")
            shared = mmap.mmap(fd, session.size, flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)  # the mapping keeps the memory
        anchor = (ctypes.c_char * session.size).from_buffer(shared)
        return _Mapping(target, session, shared, anchor, ctypes.addressof(anchor))

    def _drop(self, mapping: _Mapping) -> None:
        """No new copy goes to ``mapping``; it is unmapped now, or by the last copy using it."""
        mapping.gone = True
        if self._maps.get(mapping.key) is mapping:
            del self._maps[mapping.key]
        if not mapping.writes:
            self._unmap(mapping)

    @staticmethod
    def _unmap(mapping: _Mapping) -> None:
        mapping.anchor = None  # the map's last export: it may close now
        mapping.map.close()


def _alive(session: ShmSession) -> bool:
    try:
        return os.readlink(f"/proc/{session.pid}/fd/{session.fd}") == f"/memfd:{session.memfd_name} (deleted)"
    except OSError:
        return False
