"""Sharding by name: meshes over (data, fsdp, tensor), logical axis rules, multi-host start-up.

``mesh`` builds meshes from specs like ``"data:2,fsdp:4,tensor:1"``; ``rules`` maps the logical
names that params and activations carry onto those axes and creates params already sharded;
``distributed`` initialises multi-host JAX when the environment asks; ``pod`` builds the gcloud
commands that run a job on every worker of a Cloud TPU VM pod.
"""

from jaxllm.parallel.distributed import maybe_initialize
from jaxllm.parallel.mesh import AXES, make_mesh, parse_mesh_spec
from jaxllm.parallel.rules import (
    DEFAULT_RULES,
    batch_sharding,
    check_sharded,
    init_sharded,
    logical_sharding,
    mesh_rules,
    param_shardings,
    validate_divisibility,
    with_sharding_constraint,
)

__all__ = [
    "AXES",
    "DEFAULT_RULES",
    "batch_sharding",
    "check_sharded",
    "init_sharded",
    "logical_sharding",
    "make_mesh",
    "maybe_initialize",
    "mesh_rules",
    "param_shardings",
    "parse_mesh_spec",
    "validate_divisibility",
    "with_sharding_constraint",
]
