"""Ahead-of-time compilation of the engine's step for a TPU topology: does a model serve there, and
how large a KV pool fits?

The engine's device program (`jaxllm.serve.step.device_step`: the model over one ragged pass through the
paged cache, then sampling) is lowered with the engine's tensor-parallel shardings
(`jaxllm.serve.sharding`) over a described TPU slice and compiled by XLA:TPU, as
`jaxllm.train.aot` does for training. Per chip: the weights and the KV pool (exact, from their
shardings), XLA's temporaries, and the largest pool that fits beside them in HBM.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.model import kernels, llama
from jaxllm.parallel import make_mesh
from jaxllm.serve import sharding
from jaxllm.serve.cache import KVPool, RaggedBatch
from jaxllm.serve.step import device_step, llama_logits_fn
from jaxllm.serve.paged_attention import AttentionFn, paged_attention
from jaxllm.serve.sampling import sampling_rows
from jaxllm.train.aot import HBM_BYTES, format_bytes, topology_devices


@dataclasses.dataclass(frozen=True)
class ServeReport:
    topology: str
    chips: int
    device_kind: str
    mesh: str
    pool_tokens: int
    fits: bool
    weight_bytes: int = 0
    pool_bytes: int = 0
    temp_bytes: int = 0
    kv_bytes_per_token: int = 0  # per chip
    hbm_bytes: int = 0
    compile_seconds: float = 0.0
    kernel_calls: int = 0  # Pallas (Mosaic) kernel call sites in the lowered program
    error: str = ""

    @property
    def max_pool_tokens(self) -> int:
        """Tokens of KV pool that fit per chip beside the weights and the step's temporaries."""
        free = self.hbm_bytes - self.weight_bytes - self.temp_bytes
        return max(free, 0) // self.kv_bytes_per_token if self.kv_bytes_per_token else 0

    def summary(self) -> str:
        gib = format_bytes
        head = f"{self.topology} ({self.chips} x {self.device_kind}), mesh {self.mesh}"
        if self.error:
            return f"{head}\n  DOES NOT FIT: {self.error}"
        total = self.weight_bytes + self.pool_bytes + self.temp_bytes
        return (f"{head}\n  per chip: weights {gib(self.weight_bytes)}, KV pool {gib(self.pool_bytes)} "
                f"({self.pool_tokens} tokens), temporaries {gib(self.temp_bytes)}, total {gib(total)} of "
                f"{gib(self.hbm_bytes)} HBM -> {'FITS' if self.fits else 'DOES NOT FIT'}\n"
                f"  KV {self.kv_bytes_per_token} bytes/token/chip; largest pool that fits: "
                f"{self.max_pool_tokens:,} tokens; {self.kernel_calls} Pallas kernel call sites, "
                f"compiled in {self.compile_seconds:.0f} s")


def _nbytes(abstract) -> int:
    """Per-chip bytes of a tree of sharded ShapeDtypeStructs."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def compile_serve_step(cfg: llama.LlamaConfig, topology: str, mesh_spec: str, *, num_blocks: int,
                       block_size: int = 16, token_budget: int = 256, max_seqs: int = 64, context_len: int = 4096,
                       attention: AttentionFn = paged_attention) -> ServeReport:
    """Compile one engine pass (`token_budget` tokens of up to `max_seqs` sequences with contexts
    up to `context_len`) over a pool of `num_blocks` × `block_size` tokens for `topology`."""
    devices = topology_devices(topology)
    mesh = make_mesh(mesh_spec, devices=devices)
    sharding.check_mesh(cfg, mesh)
    kind = devices[0].device_kind
    base = dict(topology=topology, chips=len(devices), device_kind=kind, mesh=mesh_spec,
                pool_tokens=num_blocks * block_size, hbm_bytes=HBM_BYTES.get(kind, 0))
    cfg = sharding.serving_config(cfg, mesh)  # as the engine runs it: kv heads repeated up to the shards
    put = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    params = jax.tree.map(put, jax.eval_shape(lambda r: llama.init_params(cfg, r), jax.random.key(0)),
                          sharding.param_shardings(cfg, mesh))
    pool_shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
    pool_sharding = sharding.pool_sharding(cfg, mesh).k
    pool = KVPool(*(jax.ShapeDtypeStruct(pool_shape, cfg.compute_dtype, sharding=pool_sharding),) * 2)
    replicated = NamedSharding(mesh, PartitionSpec())
    host = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated)  # noqa: E731
    T, S, W = token_budget, min(max_seqs, token_budget), -(-context_len // block_size)
    batch = RaggedBatch(*(host(np.zeros(shape, dtype)) for shape, dtype in (
        ((T,), np.int32), ((T,), np.int32), ((T,), np.int32), ((T,), np.int32), ((S, W), np.int32),
        ((S,), np.int32), ((S,), np.int32), ((S,), bool))))
    rows = jax.tree.map(host, sampling_rows([], [], [], [], S))
    offsets = host(np.zeros(S, np.int32))
    treedef = jax.tree.structure(0)
    logits_fn = llama_logits_fn(cfg)
    context = sharding.step_context(cfg, mesh)

    def step(params, pools, batches, offsets, rows):
        with context():
            return device_step(logits_fn, attention, treedef, cfg.vocab_size, params, pools, batches, offsets, rows)

    per_token = 2 * cfg.n_layers * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize * (
        cfg.n_kv_heads // mesh.shape["tensor"] if sharding.kv_heads_sharded(cfg, mesh) else cfg.n_kv_heads)
    base.update(weight_bytes=_nbytes(params), pool_bytes=_nbytes(pool), kv_bytes_per_token=per_token)
    start = time.time()
    try:
        with kernels.target_platform(devices[0].platform):
            lowered = jax.jit(step).lower(params, (pool,), (batch,), (offsets,), rows)
        base["kernel_calls"] = lowered.as_text().count("tpu_custom_call")
        compiled = lowered.compile()
    except Exception as e:  # XLA reports HBM exhaustion as a compile failure
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return ServeReport(**base, fits=False, compile_seconds=time.time() - start, error=str(e).splitlines()[0][:300])
    temp = compiled.memory_analysis().temp_size_in_bytes
    total = base["weight_bytes"] + base["pool_bytes"] + temp
    return ServeReport(**base, fits=not base["hbm_bytes"] or total <= base["hbm_bytes"], temp_bytes=temp,
                       compile_seconds=time.time() - start)
