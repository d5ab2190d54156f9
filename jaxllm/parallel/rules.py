"""Logical axis rules: how named array dimensions map onto the (data, fsdp, tensor) mesh.

Model code never names mesh axes. Parameters carry logical names through
``nn.with_logical_partitioning`` (embedding ``("vocab", "embed")``, attention q
``("embed", "heads", None)``, k/v ``("embed", "kv_heads", None)``, o ``("heads", None, "embed")``,
MLP gate/up ``("embed", "mlp")``, down ``("mlp", "embed")``, norm scales ``(None,)``, LM head
``("embed", "vocab")``; ``nn.scan`` over layers prepends ``"layers"``), activations carry
``("batch", "length", ...)``. The rules below turn those names into ``NamedSharding``s for a mesh,
so one model runs on 1 CPU, on 8 fake CPU devices and on a TPU pod.

Rules are ordered pairs ``(logical_name, mesh_axes)`` with flax's priority semantics: a logical
dimension takes its mesh axes only if no earlier dimension of the same array already took them.
So activations ``("batch", "length", "embed")`` shard batch over data+fsdp and leave embed whole.
Mesh axes a rule names but the mesh lacks are dropped, and a mesh axis of size 1 shards nothing,
so the same rules work on any mesh.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

Rule = tuple[str, str | tuple[str, ...] | None]
Rules = Sequence[Rule]

DEFAULT_RULES: tuple[Rule, ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_rules(rules: Rules, mesh: jax.sharding.Mesh) -> tuple[Rule, ...]:
    """``rules`` restricted to the axes ``mesh`` has (absent axes dropped), validated.

    The result is what ``nn.logical_axis_rules`` should see for this mesh.
    """
    if not isinstance(rules, (tuple, list)):
        raise ValueError(f"logical axis rules must be a sequence of (name, mesh_axes) pairs, got {rules!r}")
    restricted = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"logical axis rule {rule!r} is not a (logical_name, mesh_axes) pair")
        logical, target = rule
        targets = (target,) if isinstance(target, str) else target
        if not (targets is None or (isinstance(targets, (tuple, list)) and all(isinstance(a, str) for a in targets))):
            raise ValueError(f"logical axis rule {rule!r}: mesh axes must be names, None or a tuple of names")
        kept = tuple(axis for axis in targets or () if axis in mesh.axis_names)
        restricted.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(restricted)


def _mesh_spec(logical_spec: PartitionSpec, rules: Rules, where: str) -> PartitionSpec:
    """Mesh ``PartitionSpec`` of one array from its logical names; unknown names are an error."""
    known = {logical for logical, _ in rules}
    unknown = [name for name in logical_spec if isinstance(name, str) and name not in known]
    if unknown:
        raise ValueError(f"{where}: logical axis names {unknown} have no rule; rules cover {sorted(known)}")
    return nn.logical_to_mesh_axes(tuple(logical_spec), rules)


def _path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _axis_size(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...] | None) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[axis] for axis in axes)


def _mesh_specs(abstract_boxed: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """Tree of mesh ``PartitionSpec``s, one per unboxed leaf, checked for divisibility."""
    rules = mesh_rules(rules, mesh)
    logical_specs = nn.get_partition_spec(abstract_boxed)
    # Unbox without the sharding constraint a LogicallyPartitioned box applies under a mesh.
    shapes = jax.tree_util.tree_map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, meta.Partitioned) else meta.unbox(x),
        abstract_boxed,
        is_leaf=meta.is_axis_metadata,
    )

    def one(path, shape_struct, logical_spec):
        where = f"parameter {_path_name(path)!r}"
        spec = _mesh_spec(logical_spec, rules, where)
        for dim, (size, axes) in enumerate(zip(shape_struct.shape, spec)):
            shards = _axis_size(mesh, axes)
            if size % shards:
                raise ValueError(
                    f"{where} of shape {tuple(shape_struct.shape)}: dimension {dim} "
                    f"(logical {logical_spec[dim]!r}, size {size}) is not divisible by mesh axis "
                    f"{axes!r} of size {shards}"
                )
        return spec

    return jax.tree_util.tree_map_with_path(one, shapes, logical_specs)


def validate_divisibility(abstract_boxed: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """Raise ``ValueError`` if any parameter dimension does not divide by its mesh axes.

    ``abstract_boxed`` is a variable tree whose leaves are ``LogicallyPartitioned`` boxes (or
    plain arrays, which are replicated) around arrays or ``ShapeDtypeStruct``s, e.g. the result
    of ``jax.eval_shape(model.init, ...)``. The message names the parameter path, the dimension,
    its logical name and size, the mesh axis and its size.
    """
    _mesh_specs(abstract_boxed, mesh, rules)


def param_shardings(abstract_boxed: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` tree (shaped like the unboxed variables) for a boxed variable tree.

    Validates divisibility first, so a bad mesh fails here with a named dimension rather than
    inside XLA.
    """
    specs = _mesh_specs(abstract_boxed, mesh, rules)
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def init_sharded(
    init_fn: Callable[..., Any], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES, *args: Any
) -> tuple[Any, Any]:
    """Run ``init_fn(*args)`` so that every parameter is born with its sharding.

    ``init_fn`` returns boxed variables (e.g. ``lambda rng: model.init(rng, tokens_BT)``). Its
    output is traced abstractly to find the shardings, then the init runs under ``jax.jit`` with
    those ``out_shardings``: no full copy of the parameters ever lives on one device. Returns
    ``(variables, shardings)``, both unboxed so downstream code sees plain arrays.
    """
    rules = mesh_rules(rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = param_shardings(abstract, mesh, rules)
        variables = jax.jit(lambda *a: meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return variables, shardings


def logical_sharding(
    logical_axes: Sequence[str | None], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    """``NamedSharding`` for an array whose dimensions carry ``logical_axes``."""
    rules = mesh_rules(rules, mesh)
    return NamedSharding(mesh, _mesh_spec(PartitionSpec(*logical_axes), rules, f"array {tuple(logical_axes)}"))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of ``[B, T]`` inputs (tokens, masks, positions): batch over its rule's axes."""
    return logical_sharding(("batch", "length"), mesh, rules)


def with_sharding_constraint(
    x: jax.Array, logical_axes: Sequence[str | None], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES
) -> jax.Array:
    """Constrain an activation inside ``jax.jit`` to the sharding of its logical axes."""
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, mesh, rules))


def check_sharded(params: Any, shardings: Any = None, max_unsharded_fraction: float = 0.01) -> float:
    """Fraction of parameter bytes fully replicated; ``ValueError`` if it exceeds the tolerance.

    ``shardings`` defaults to each array's own ``.sharding``. On a single device nothing can be
    sharded and the fraction is 0. The error names the largest replicated parameters, which is
    where a missing or misspelt logical annotation shows up.
    """
    if shardings is None:
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    sharding_leaves = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    if len(leaves) != len(sharding_leaves):
        raise ValueError(f"params have {len(leaves)} arrays but shardings has {len(sharding_leaves)} entries")
    total = 0
    replicated = []
    for (path, x), sharding in zip(leaves, sharding_leaves):
        nbytes = x.size * x.dtype.itemsize
        total += nbytes
        if sharding.num_devices > 1 and sharding.is_fully_replicated:
            replicated.append((nbytes, _path_name(path)))
    fraction = sum(nbytes for nbytes, _ in replicated) / total if total else 0.0
    if fraction > max_unsharded_fraction:
        largest = ", ".join(f"{name} ({nbytes} bytes)" for nbytes, name in sorted(replicated, reverse=True)[:5])
        raise ValueError(
            f"{fraction:.1%} of parameter bytes are fully replicated, above the tolerance of "
            f"{max_unsharded_fraction:.1%}; largest replicated: {largest}"
        )
    return fraction
