"""Ahead-of-time compilation of the training step for a TPU topology, from any host.

With libtpu installed, `jax.experimental.topologies.get_topology_desc` describes a TPU slice
(e.g. "v5p:8x8x4") without owning it; the real training step (forward, backward, AdamW update) is
lowered with the real shardings and compiled by XLA:TPU. XLA's memory analysis then says whether
the program fits each chip's HBM — an over-budget program fails to compile with
RESOURCE_EXHAUSTED — before any TPU time is spent.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.model import flops, kernels, llama
from jaxllm.objectives import lm
from jaxllm.parallel import make_mesh, rules
from jaxllm.train.state import TrainState, opt_state_shardings
from jaxllm.train.step import make_train_step

GiB = 1 << 30


def format_bytes(b: int) -> str:
    """Bytes as GiB, or MiB below a tenth of a GiB (the pre-flight reports' unit)."""
    return f"{b / GiB:.2f} GiB" if b >= GiB // 10 else f"{b / (1 << 20):.2f} MiB"
HBM_BYTES = {  # per chip, by jax device_kind
    "TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5": 95 * GiB, "TPU v5p": 95 * GiB,
    "TPU v6 lite": 32 * GiB, "TPU v6e": 32 * GiB,
}


@dataclasses.dataclass(frozen=True)
class AotReport:
    topology: str
    chips: int
    device_kind: str
    mesh: str
    fits: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    hbm_bytes: int = 0
    model_flops: float = 0.0
    compile_seconds: float = 0.0
    kernel_calls: int = 0  # Pallas (Mosaic) kernel call sites in the lowered program
    error: str = ""

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def summary(self) -> str:
        gib = format_bytes
        head = f"{self.topology} ({self.chips} x {self.device_kind}), mesh {self.mesh}"
        if not self.fits and not self.argument_bytes:
            return f"{head}\n  DOES NOT FIT: {self.error}"
        return (f"{head}\n  per chip: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
                f"(aliased {gib(self.alias_bytes)}), temporaries {gib(self.temp_bytes)}, total {gib(self.total_bytes)} "
                f"of {gib(self.hbm_bytes)} HBM -> {'FITS' if self.fits else 'DOES NOT FIT'}\n"
                f"  model FLOPs per step {self.model_flops:.3e} (6 x matmul params + causal attention), "
                f"{self.kernel_calls} Pallas kernel call sites, compiled in {self.compile_seconds:.0f} s")


def topology_devices(topology: str):
    """The devices of a TPU topology description; needs libtpu (`pip install jaxllm[tpu]`).

    Several processes on one host may load libtpu only to describe topologies, so libtpu's
    single-process lock is waived (ALLOW_MULTIPLE_LIBTPU_LOAD)."""
    import os
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu raises assorted types for bad names
        raise ValueError(f"cannot describe TPU topology {topology!r} (names look like 'v5p:8x8x4', "
                         f"'v5e:16x16'; libtpu must be installed): {e}") from e


def abstract_train_state(cfg: llama.LlamaConfig, optimizer, mesh):
    """TrainState of ShapeDtypeStructs carrying the shardings the real run would use."""
    model = llama.Llama(cfg)
    mesh_rules = rules.mesh_rules(rules.DEFAULT_RULES, mesh)
    import flax.linen as nn
    with nn.logical_axis_rules(mesh_rules):
        boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)), jax.random.key(0))
    shardings = rules.param_shardings(boxed, mesh, mesh_rules)["params"]
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed)["params"], shardings)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt,
                             opt_state_shardings(optimizer, abstract_opt, shardings, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                      opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))


def check_batch(batch: int, grad_accum: int, mesh) -> None:
    """ValueError unless each of the `grad_accum` micro-batches splits over the data-parallel axes."""
    data = mesh.shape["data"] * mesh.shape["fsdp"]
    if grad_accum < 1 or batch % grad_accum or (batch // grad_accum) % data:
        raise ValueError(f"global batch {batch} with grad_accum {grad_accum} does not split into micro-batches "
                         f"divisible by the data-parallel size {data} (data x fsdp of mesh {dict(mesh.shape)}); "
                         f"use a batch that is a multiple of {data * max(grad_accum, 1)}")


def compile_train_step(cfg: llama.LlamaConfig, topology: str, mesh_spec: str, batch: int, seq_len: int,
                       learning_rate: float = 1e-4, grad_accum: int = 1) -> AotReport:
    """Compile fwd + bwd + AdamW for `topology` and report per-chip memory and model FLOPs. The
    attention is `cfg.attention` (Pallas kernels lower for the TPU from any host)."""
    import time
    devices = topology_devices(topology)
    mesh = make_mesh(mesh_spec, devices=devices)
    check_batch(batch, grad_accum, mesh)
    kind = devices[0].device_kind
    base = dict(topology=topology, chips=len(devices), device_kind=kind, mesh=mesh_spec,
                hbm_bytes=HBM_BYTES.get(kind, 0), model_flops=flops.train_flops_per_token(cfg, seq_len) * batch * seq_len)
    optimizer = optax.adamw(learning_rate, weight_decay=0.1)
    with kernels.target_platform(devices[0].platform):  # init traces the forward
        state = abstract_train_state(cfg, optimizer, mesh)

    def loss_fn(params, b, rng):
        logits = llama.forward(cfg, params, b["tokens"])
        return {"nll": lm.nll_loss(logits, b["tokens"], b["loss_mask"])}, {}

    batch_sharding = rules.logical_sharding(("batch",), mesh)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding)
    abstract_batch = {"tokens": tokens,
                      "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=batch_sharding)}
    step = make_train_step(loss_fn, optimizer, mesh, grad_accum=grad_accum,
                           state_shardings=jax.tree.map(lambda x: x.sharding, state))
    start = time.time()
    try:
        with kernels.target_platform(devices[0].platform):
            lowered = step.lower(state, abstract_batch)
        base["kernel_calls"] = lowered.as_text().count("tpu_custom_call")
        compiled = lowered.compile()
    except Exception as e:  # XLA reports HBM exhaustion as a compile failure
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return AotReport(**base, fits=False, compile_seconds=time.time() - start, error=str(e).splitlines()[0][:300])
    mem = compiled.memory_analysis()
    report = AotReport(**base, fits=True, argument_bytes=mem.argument_size_in_bytes,
                       output_bytes=mem.output_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                       alias_bytes=mem.alias_size_in_bytes, compile_seconds=time.time() - start)
    hbm = report.hbm_bytes
    return dataclasses.replace(report, fits=not hbm or report.total_bytes <= hbm)
