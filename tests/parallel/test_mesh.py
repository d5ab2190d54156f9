"""Mesh specs: parsing, the -1 axis, errors, and the meshes built from them on 8 fake CPU devices."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

import numpy as np  # noqa: E402

from jaxllm.parallel.mesh import AXES, hybrid_device_array, make_mesh, parse_mesh_spec  # noqa: E402


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data:2,fsdp:4,tensor:1", {"data": 2, "fsdp": 4, "tensor": 1}),
        ("fsdp:-1", {"data": 1, "fsdp": 8, "tensor": 1}),
        ("tensor:2, data:-1", {"data": 4, "fsdp": 1, "tensor": 2}),
        ("data:2,fsdp:2,tensor:2", {"data": 2, "fsdp": 2, "tensor": 2}),
        ("fsdp:4,tensor:-1", {"data": 1, "fsdp": 4, "tensor": 2}),
    ],
)
def test_parse_mesh_spec(spec, expected):
    assert parse_mesh_spec(spec, 8) == expected


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("data:3", ["'data:3'", "3 devices", "8 devices"]),
        ("data:2,fsdp:2", ["'data:2,fsdp:2'", "4 devices", "8 devices"]),
        ("model:8", ["'model'", "unknown axis"]),
        ("data:2,fsdp:-1,tensor:-1", ["only one axis may be -1"]),
        ("data:3,fsdp:-1", ["multiply to 3", "device count 8"]),
        ("fsdp:0", ["size 0"]),
        ("fsdp:x", ["'x'", "not an integer"]),
        ("fsdp", ["'fsdp'", "axis:size"]),
        ("fsdp:4,fsdp:2", ["'fsdp' appears more than once"]),
        ("", ["non-empty"]),
    ],
)
def test_parse_mesh_spec_errors(spec, fragments):
    with pytest.raises(ValueError) as err:
        parse_mesh_spec(spec, 8)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_make_mesh_has_all_axes_auto_and_every_device():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = make_mesh("tensor:2,fsdp:-1")
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_given_devices():
    if jax.device_count() < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    devices = jax.devices()[:2]
    mesh = make_mesh(devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1}
    assert set(mesh.devices.flat) == set(devices)
    with pytest.raises(ValueError, match="'fsdp:4' multiplies to 4 devices but there are 2"):
        make_mesh("fsdp:4", devices=devices)


class FakeTpu:
    """A device of a multislice job: what create_hybrid_device_mesh reads."""
    platform, device_kind = "cpu", "fake"

    def __init__(self, id, slice_index):
        self.id, self.slice_index, self.process_index = id, slice_index, slice_index

    def __repr__(self):
        return f"d{self.id}@s{self.slice_index}"


def test_dcn_axis_crosses_slices_only_in_its_dcn_part():
    devices = [FakeTpu(i, i // 4) for i in range(16)]  # 4 slices of 4 chips, listed slice by slice
    array = hybrid_device_array("fsdp:2,tensor:2", "data:2,fsdp:2", devices)
    assert array.shape == (2, 4, 2)
    slices = np.vectorize(lambda d: d.slice_index)(array)
    # tensor stays inside a slice; fsdp's outer factor of 2 and data cross slices
    assert (slices[:, :, 0] == slices[:, :, 1]).all()
    assert (slices[:, :2] == slices[:, :2, :1]).all() and (slices[:, 2:] == slices[:, 2:, :1]).all()
    assert sorted(slices[:, ::2, 0].ravel()) == [0, 1, 2, 3]
    assert sorted(d.id for d in array.ravel()) == list(range(16))


def test_dcn_mesh_on_cpu_devices_counts_processes_as_slices():
    mesh = make_mesh("fsdp:4,tensor:2", dcn="data:1")  # one process: one slice
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match=r"dcn spec 'data:2' does not fit the 1 slice"):
        make_mesh("fsdp:4", dcn="data:2")
