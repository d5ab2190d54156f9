"""Mesh specs: parsing, the -1 axis, errors, and the meshes built from them on 8 fake CPU devices."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxllm.parallel.mesh import AXES, make_mesh, parse_mesh_spec  # noqa: E402


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
