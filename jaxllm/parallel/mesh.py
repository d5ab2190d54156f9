"""Device meshes from short textual specs such as ``"data:2,fsdp:4,tensor:1"``.

Every mesh built here carries the three axes of the project's sharding scheme in a fixed order,
``data``, ``fsdp``, ``tensor`` (outermost to innermost: data parallelism tolerates the slowest
links, tensor parallelism wants the fastest), with size 1 for any axis the spec leaves out. The
logical axis rules in ``rules.py`` can therefore name all three axes and apply unchanged to every
mesh, from one CPU to a TPU pod. Axis types are ``Auto``: linen's logical partitioning
(``with_logical_partitioning``, ``with_logical_constraint``) only works on Auto axes.

Multislice (several TPU slices joined by the data-centre network, DCN): a second spec ``dcn``
splits the axes across slices, e.g. ``make_mesh("fsdp:256", dcn="data:4")`` over 4 slices of 256
chips: each axis's size is its in-slice (ICI) size times its DCN size, and
``mesh_utils.create_hybrid_device_mesh`` orders devices so that only the DCN part of an axis
crosses slices (MaxText's ``dcn_*_parallelism``). Devices without a ``slice_index`` (CPU, GPU)
count each process as a slice.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """Axis sizes, in ``AXES`` order, of a spec like ``"data:2,fsdp:-1"`` over ``num_devices``.

    Axes left out of the spec get size 1; at most one axis may be ``-1``, meaning "the devices
    that remain". The product of the sizes must equal ``num_devices``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec must be a non-empty string like 'data:2,fsdp:-1', got {spec!r}")
    given: dict[str, int] = {}
    for entry in spec.split(","):
        name, sep, size_text = entry.strip().partition(":")
        name = name.strip()
        if not sep:
            raise ValueError(f"mesh spec {spec!r}: entry {entry!r} is not of the form axis:size")
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; known axes are {AXES}")
        if name in given:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} appears more than once")
        try:
            size = int(size_text)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size {size_text!r} of axis {name!r} is not an integer") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh spec {spec!r}: size {size} of axis {name!r} must be positive or -1")
        given[name] = size

    rest = [name for name, size in given.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    fixed = math.prod(size for size in given.values() if size != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"mesh spec {spec!r}: fixed axes multiply to {fixed}, which does not divide the "
                f"device count {num_devices}, so axis {rest[0]!r} cannot be -1"
            )
        given[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh spec {spec!r} multiplies to {fixed} devices but there are {num_devices} devices"
        )
    return {name: given.get(name, 1) for name in AXES}


def hybrid_device_array(spec: str, dcn: str, devices: Sequence) -> np.ndarray:
    """Devices laid out [data, fsdp, tensor] with ``spec`` inside each slice and ``dcn`` across
    slices (see the module docstring); ValueError naming the spec that does not fit."""
    granule = (lambda d: d.slice_index) if hasattr(devices[0], "slice_index") else (lambda d: d.process_index)
    num_slices = len({granule(d) for d in devices})
    try:
        dcn_sizes = parse_mesh_spec(dcn, num_slices)
    except ValueError as e:
        raise ValueError(f"dcn spec {dcn!r} does not fit the {num_slices} slice(s) of the devices: {e}") from None
    per_slice = len(devices) // num_slices
    ici_sizes = parse_mesh_spec(spec, per_slice)
    return mesh_utils.create_hybrid_device_mesh(tuple(ici_sizes.values()), tuple(dcn_sizes.values()), devices,
                                                process_is_granule=not hasattr(devices[0], "slice_index"))


def make_mesh(spec: str = "fsdp:-1", devices: Sequence[jax.Device] | None = None, *,
              dcn: str | None = None) -> jax.sharding.Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor) sized by ``spec`` over ``devices``.

    ``devices`` defaults to all global devices (every host of a pod); pass a topology's devices
    to build a mesh for ahead-of-time compilation. Device placement goes through
    ``jax.make_mesh``, which orders TPU devices so the inner axes follow the physical links.
    With ``dcn`` the mesh spans slices: ``spec`` then sizes the axes within one slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    if dcn is not None:
        return jax.sharding.Mesh(hybrid_device_array(spec, dcn, devices), AXES,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )
