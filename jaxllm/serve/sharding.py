"""The engine on a device mesh: Megatron-style tensor parallelism over the `tensor` axis.

Parameters take the project's logical axis rules (`jaxllm.parallel.rules`): attention heads, MLP
hidden units and the vocabulary split over `tensor`. The KV pool [L, N, P, G, K] splits its kv
heads G over `tensor` as the k/v projections do; when there are fewer kv heads than shards (or
they do not divide), the k/v projections and the pool keep every kv head on every shard
(replicated), as vLLM does. The jitted step then runs under the mesh with the same rules, so the
model's activation constraints apply and XLA inserts the collectives.

Only `tensor` is used: one engine pass is one flat row, with no batch axis to split over
`data`/`fsdp`.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.model import llama
from jaxllm.parallel import rules as rules_lib
from jaxllm.serve.cache import KVPool


def check_mesh(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh) -> None:
    """ValueError unless `mesh` shards only `tensor` and its size divides the query heads."""
    others = {name: size for name, size in mesh.shape.items() if name != "tensor" and size > 1}
    if others:
        raise ValueError(f"the engine shards over the 'tensor' axis only; mesh {dict(mesh.shape)} also splits {others}")
    tensor = mesh.shape.get("tensor", 1)
    if cfg.n_heads % tensor:
        raise ValueError(f"mesh axis 'tensor' of size {tensor} does not divide the model's n_heads={cfg.n_heads}")


def kv_heads_sharded(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh) -> bool:
    """Whether kv heads split over `tensor` (else every shard keeps all of them)."""
    return cfg.n_kv_heads % mesh.shape.get("tensor", 1) == 0


def engine_rules(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh) -> tuple:
    """The logical rules for `mesh`, with kv heads replicated when they do not divide over `tensor`."""
    rules = rules_lib.DEFAULT_RULES
    if not kv_heads_sharded(cfg, mesh):
        rules = tuple(("kv_heads", None) if name == "kv_heads" else (name, axes) for name, axes in rules)
    return rules_lib.mesh_rules(rules, mesh)


def param_shardings(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh):
    """NamedShardings of the model's params under the engine's rules (ValueError naming a
    dimension that does not divide)."""
    rules = engine_rules(cfg, mesh)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: llama.Llama(cfg).init(r, jnp.zeros((1, 8), jnp.int32)), jax.random.key(0))
    return rules_lib.param_shardings(boxed, mesh, rules)["params"]


def shard_params(cfg: llama.LlamaConfig, params, mesh: jax.sharding.Mesh):
    """`params` placed on `mesh` by the engine's rules."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def pool_sharding(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh) -> KVPool:
    """Shardings of the KV pool arrays [L, N, P, G, K]."""
    g = "tensor" if kv_heads_sharded(cfg, mesh) else None
    sharding = NamedSharding(mesh, PartitionSpec(None, None, None, g, None))
    return KVPool(sharding, sharding)


def step_context(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh | None):
    """A context-manager factory to trace the engine step in: the mesh and its rules, or nothing."""
    if mesh is None:
        return contextlib.nullcontext
    rules = engine_rules(cfg, mesh)

    @contextlib.contextmanager
    def context():
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            yield

    return context
