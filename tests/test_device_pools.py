"""Pools on a device: ``Settings.device`` names where the receiver's pool and its results
live; every copy is a torch copy (device-agnostic); a CPU pool is pinned where torch can pin.

The conformance suite runs every case on each device present (test_conformance.py: cuda is
skipped, with why, on a host without one; ``.ci/gpu-check`` runs it on a GPU host).  Here:
the setting's checks, what a CPU-only host does with a cuda pool, and the CPU pool's pinning."""

from __future__ import annotations

import pytest
import torch

from embxfer.adapters import connect_loopback
from embxfer.adapters.workload import room_data
from embxfer.core import AuxHeader, LocalProtocolError, Settings, SettingsError
from embxfer.transports.buffers import Assembly, EmbeddingData, PoolBuffers, SourceRows, can_pin

SMALL = dict(block_size=16, default_blocks=2, pool_blocks=8, hidden_size=8, dtype="float32")


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:1023"])
def test_device_names_torch_understands_are_accepted(device: str) -> None:
    assert Settings(device=device, data_plane="nixl").device == device


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:01", "cuda:-1", "cuda:x", "mps", "", 0, None])
def test_other_device_names_are_refused_naming_the_field(device: object) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings(device=device)  # type: ignore[arg-type]
    assert refused.value.field == "device" and "cpu, cuda or cuda:N" in str(refused.value)


@pytest.mark.parametrize("plane", ["zmq", "shm", "auto"])
def test_a_device_pool_on_a_plane_that_writes_host_memory_is_refused(plane: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings(device="cuda", data_plane=plane)
    assert refused.value.field == "device" and f"the {plane} data plane writes the pool as host memory" in str(refused.value)
    with pytest.raises(SettingsError) as from_env:
        Settings.from_env({"EMBXFER_DEVICE": "cuda:0", "EMBXFER_DATA_PLANE": plane})
    assert from_env.value.field == "EMBXFER_DEVICE"


def test_the_environment_sets_the_device() -> None:
    assert Settings.from_env({"EMBXFER_DEVICE": "cuda:2"}).device == "cuda:2"
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"EMBXFER_DEVICE": "tpu"})
    assert refused.value.field == "EMBXFER_DEVICE"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_a_cuda_pool_on_a_host_without_cuda_is_a_clear_error_naming_the_field() -> None:
    with pytest.raises(LocalProtocolError) as refused:
        connect_loopback(Settings(device="cuda", **SMALL))
    assert refused.value.field == "device" and "this torch sees no CUDA device" in str(refused.value)


def test_a_cpu_pool_is_pinned_exactly_where_torch_can_pin() -> None:
    pool = PoolBuffers(Settings(**SMALL))
    assert pool.device == torch.device("cpu")
    assert pool.pinned == can_pin() == torch.cuda.is_available()
    for tensor in (pool.embeddings, pool.fill_ids, pool.mrope, pool.aux):
        assert tensor.is_pinned() == pool.pinned
        assert not tensor.any()


def test_results_are_assembled_on_the_pools_device_from_rows_copied_by_torch() -> None:
    settings = Settings(**SMALL)
    data = room_data(3, 1, settings, num_tokens=20)
    pool = PoolBuffers(settings)
    pool.write(SourceRows(data), 0, [(0, 0, 20)])
    header = AuxHeader(room=1, total_tokens=20, mrope_position_delta=data.mrope_position_delta,
                       hidden_size=settings.hidden_size, dtype=settings.dtype)
    assembly = Assembly(header, settings)
    assembly.collect(pool, [(0, 0, 12)], 0)
    assembly.collect(pool, [(12, 0, 8)], 12)
    result = assembly.result()
    assert result.embeddings.device == pool.device and result.same_bytes(data)


def test_rows_in_host_memory_are_staged_as_they_are() -> None:
    source = SourceRows(room_data(3, 1, Settings(**SMALL), num_tokens=5))
    assert source.on_host() is source


class DeviceEngine:
    """A write engine that reads device memory (as NIXL and Mooncake's CUDA build do), or
    refuses it (``refuse``: a Mooncake build without CUDA)."""

    name = "device engine"
    needs_registration = True
    host_memory_only = False
    inline_bytes = 0
    notes = False

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.registered: list[torch.Tensor] = []

    def register(self, tensor: torch.Tensor) -> None:
        if self.refuse and tensor.device.type != "cpu":
            raise RuntimeError("register_memory returned -1")
        self.registered.append(tensor)

    def unregister(self, tensor: torch.Tensor) -> None:
        self.registered = [held for held in self.registered if held is not tensor]

    def learn(self, target, layout) -> None:  # type: ignore[no-untyped-def]
        pass

    def write(self, target, local, remote, lengths, note=b""):  # type: ignore[no-untyped-def]
        return 0

    def route(self, target):  # type: ignore[no-untyped-def]
        return self, target

    def prune(self, closing: bool = False) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}


def rows_on(device: str) -> SourceRows:
    # (torch's "meta" device stands in for an accelerator here: tensors that are not in host memory)
    data = room_data(3, 1, Settings(**SMALL), num_tokens=5)
    return SourceRows(EmbeddingData(data.embeddings.to(device), data.fill_ids.to(device),
                                    data.mrope_positions.to(device), data.mrope_position_delta))


def test_rows_on_a_device_are_registered_where_they_are_never_copied_through_the_host() -> None:
    from embxfer.transports.batch_writer import BatchWriter

    engine = DeviceEngine(refuse=False)
    writer = BatchWriter(engine, block_size=16, workers=1)
    source = rows_on("meta")
    writer.stage(7, source)
    assert [t.device.type for t in engine.registered[:3]] == ["meta"] * 3  # the rows themselves, no staging copy
    assert engine.registered[0] is source.embeddings and writer._arena is None
    writer.release(7)
    assert engine.registered == []
    writer.close()


def test_rows_on_a_device_the_engine_cannot_read_fail_only_that_room_with_why() -> None:
    from embxfer.core import WriteRows
    from embxfer.transports.batch_writer import BatchWriter

    engine = DeviceEngine(refuse=True)
    writer = BatchWriter(engine, block_size=16, workers=1)
    writer.stage(7, rows_on("meta"))  # does not raise: the room's writes fail instead
    outcomes: list[str | None] = []
    writer.submit(WriteRows(7, 0, 0, 0, 5, ((0, 0, 5),)), "peer", None, lambda write, error: outcomes.append(error))  # type: ignore[arg-type]
    assert outcomes == ["device engine cannot read rows on meta: register_memory returned -1"]
    assert engine.registered == []  # what it had registered before the refusal was let go
    writer.release(7)
    writer.close()
