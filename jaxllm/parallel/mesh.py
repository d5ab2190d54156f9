"""Device meshes from short textual specs such as ``"data:2,fsdp:4,tensor:1"``.

Every mesh built here carries the three axes of the project's sharding scheme in a fixed order,
``data``, ``fsdp``, ``tensor`` (outermost to innermost: data parallelism tolerates the slowest
links, tensor parallelism wants the fastest), with size 1 for any axis the spec leaves out. The
logical axis rules in ``rules.py`` can therefore name all three axes and apply unchanged to every
mesh, from one CPU to a TPU pod. Axis types are ``Auto``: linen's logical partitioning
(``with_logical_partitioning``, ``with_logical_constraint``) only works on Auto axes.
"""

import math
from collections.abc import Sequence

import jax

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


def make_mesh(spec: str = "fsdp:-1", devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor) sized by ``spec`` over ``devices``.

    ``devices`` defaults to all global devices (every host of a pod); pass a topology's devices
    to build a mesh for ahead-of-time compilation. Device placement goes through
    ``jax.make_mesh``, which orders TPU devices so the inner axes follow the physical links.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )
