"""The engine on a device mesh: Megatron-style tensor parallelism over the `tensor` axis.

Parameters take the project's logical axis rules (`jaxllm.parallel.rules`): attention heads, MLP
hidden units and the vocabulary split over `tensor`. The KV pool [L, N, P, G, K] splits its kv
heads G over `tensor` as the k/v projections do. With fewer kv heads than shards, each kv head is
repeated on the shards whose query heads read it, as vLLM does (`serving_config`): every shard
then holds one kv head's projections and pool, not all of them. Only a kv head count that neither
divides nor is divided by `tensor` keeps every kv head on every shard. The jitted step runs under
the mesh with the same rules, so the model's activation constraints apply and XLA inserts the
collectives.

Only `tensor` is used: one engine pass is one flat row, with no batch axis to split over
`data`/`fsdp`.
"""
from __future__ import annotations

import contextlib
import dataclasses

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


def serving_config(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh) -> llama.LlamaConfig:
    """The model as the engine runs it on `mesh`: when `tensor` is a multiple of the kv heads G,
    n_kv_heads = `tensor`, each kv head repeated tensor / G times. The attention is the same:
    query head h reads kv head h // (n_heads / G) either way, now a copy on its own shard."""
    tensor = mesh.shape.get("tensor", 1)
    if cfg.n_kv_heads < tensor and tensor % cfg.n_kv_heads == 0:
        return dataclasses.replace(cfg, n_kv_heads=tensor)
    return cfg


def repeat_kv_heads(params, cfg: llama.LlamaConfig, serving: llama.LlamaConfig):
    """`params` of `cfg` as params of `serving = serving_config(cfg, mesh)`: the k/v projections'
    kv-head axis [..., D, G, K] repeated (each head's copies adjacent)."""
    repeats = serving.n_kv_heads // cfg.n_kv_heads
    if repeats == 1:
        return params

    def repeat(path, x):
        names = [getattr(key, "key", None) for key in path[-2:]]
        return jnp.repeat(x, repeats, axis=-2) if names in (["attn", "k"], ["attn", "v"]) else x

    return jax.tree_util.tree_map_with_path(repeat, params)


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
