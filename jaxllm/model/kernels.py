"""Attention implementations chosen by name (`LlamaConfig.attention`), behind one causal call.

- "xla": dense softmax attention in plain JAX (`attention.grouped_attention`); every backend,
  O(T²) temporaries per layer.
- "splash": Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, the
  kernel MaxText trains with): block-sparse causal mask AND segment ids, grouped-query heads
  natively, O(T) memory.
- "flash": Pallas TPU flash attention (`jax.experimental.pallas.ops.tpu.flash_attention`): causal
  and segment ids; key/value heads are repeated up to the query heads (it has no GQA).
- "cudnn": cuDNN fused attention through `jax.nn.dot_product_attention(implementation="cudnn")`,
  GPU only; the causal-and-segment mask is passed as its mask.

Queries arrive already scaled (the model applies 1/sqrt(K) and any RoPE logit scale), so every
kernel runs with softmax scale 1. The Pallas kernels tile the sequence in blocks of
`block_q` × `block_kv` (multiples of the 128-lane vector width, one a multiple of the other): rows
whose length is not a block multiple are padded with a segment no real token shares, and cut back.

On a mesh (inside `jax.sharding.use_abstract_mesh` with linen's logical axis rules, as the train
step runs the model), a Pallas kernel runs under `jax.shard_map` over batch and heads: XLA cannot
partition a custom kernel call and would otherwise gather its inputs.

`interpret_mode()` runs the Pallas kernels in interpret mode on any backend (their numerics are
tested on CPU that way); `target_platform("tpu")` lets a CPU host lower them for a TPU topology
ahead of time.
"""
from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxllm.model import attention

IMPLEMENTATIONS = {"xla": None, "splash": "tpu", "flash": "tpu", "cudnn": "gpu"}  # name -> platform it needs
LANES = 128  # TPU vector lane width: Pallas TPU attention blocks are multiples of it
PAD_SEGMENT = jnp.iinfo(jnp.int32).min  # segment id of padding tokens (real ids must differ)

_target: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar("jaxllm_attention_target",
                                                                                  default=None)


@contextlib.contextmanager
def target_platform(platform: str, *, interpret: bool = False):
    """Trace attention for `platform` ("tpu", "gpu", "cpu") instead of the default backend: for
    ahead-of-time lowering on a host without that accelerator."""
    token = _target.set((platform, interpret))
    try:
        yield
    finally:
        _target.reset(token)


@contextlib.contextmanager
def interpret_mode():
    """Run the Pallas TPU kernels in interpret mode on this backend (CPU tests)."""
    with target_platform("tpu", interpret=True):
        yield


def _platform() -> tuple[str, bool]:
    return _target.get() or (jax.default_backend(), False)


def interpreting() -> bool:
    """Whether Pallas kernels run in interpret mode (`interpret_mode`)."""
    return _platform()[1]


def choices(platform: str) -> list[str]:
    """The attention implementations that run on `platform`."""
    return [name for name, need in IMPLEMENTATIONS.items() if need in (None, platform)]


def check_config(name: str, block_q: int, block_kv: int) -> None:
    """ValueError for an unknown implementation or unusable block sizes (named)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention {name!r}; choices: {list(IMPLEMENTATIONS)}")
    for label, size in (("attention_block_q", block_q), ("attention_block_kv", block_kv)):
        if size < LANES or size % LANES:
            raise ValueError(f"{label}={size} must be a positive multiple of {LANES} (the TPU lane width)")
    if max(block_q, block_kv) % min(block_q, block_kv):
        raise ValueError(f"attention_block_q={block_q} and attention_block_kv={block_kv} do not divide one "
                         "another; the sequence is padded to a multiple of both")


def check_backend(name: str) -> None:
    """ValueError if implementation `name` cannot run on the platform being traced for, naming the
    platform and the implementations that can."""
    platform, _ = _platform()
    need = IMPLEMENTATIONS.get(name, "?")
    if need is not None and need != platform:
        raise ValueError(f"attention {name!r} needs a {need.upper()} backend, but this program runs on "
                         f"{platform!r}; choices on {platform!r}: {choices(platform)}")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _splash(q_BTHK, k_BTGK, v_BTGK, seg_BT, block_q: int, block_kv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
    _, T, H, _ = q_BTHK.shape
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * H)
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                              block_q_dq=block_q, block_kv_dq=block_kv)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

    def one_row(q_THK, k_TGK, v_TGK, seg_T):
        heads_first = lambda x: x.transpose(1, 0, 2)  # noqa: E731 - the kernel takes [heads, T, K]
        out_HTK = kernel(heads_first(q_THK), heads_first(k_TGK), heads_first(v_TGK), splash.SegmentIds(seg_T, seg_T))
        return heads_first(out_HTK)

    return jax.vmap(one_row)(q_BTHK, k_BTGK, v_BTGK, seg_BT)


def _tpu_interpreted(fn):
    """`fn(*arrays, seg)` under Pallas's TPU interpreter, forward and backward. Flash attention has
    no interpret flag; the interpreter is chosen when a kernel is traced, and its backward kernels
    are traced after the forward returns, so the backward re-traces the forward inside the mode."""
    from jax.experimental.pallas import tpu as pltpu

    @jax.custom_vjp
    def run(q, k, v, seg):
        with pltpu.force_tpu_interpret_mode():
            return fn(q, k, v, seg)

    def run_fwd(q, k, v, seg):
        return run(q, k, v, seg), (q, k, v, seg)

    def run_bwd(residuals, g):
        q, k, v, seg = residuals
        with pltpu.force_tpu_interpret_mode():
            _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
            return (*vjp(g), np.zeros(seg.shape, jax.dtypes.float0))

    run.defvjp(run_fwd, run_bwd)
    return run


def _flash(q_BTHK, k_BTGK, v_BTGK, seg_BT, block_q: int, block_kv: int, interpret: bool):
    if interpret:
        return _tpu_interpreted(lambda q, k, v, s: _flash(q, k, v, s, block_q, block_kv, False))(
            q_BTHK, k_BTGK, v_BTGK, seg_BT)
    from jax.experimental.pallas.ops.tpu import flash_attention as flash
    R = q_BTHK.shape[2] // k_BTGK.shape[2]
    heads_second = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 - the kernel takes [B, heads, T, K]
    k_BHTK = heads_second(jnp.repeat(k_BTGK, R, axis=2))
    v_BHTK = heads_second(jnp.repeat(v_BTGK, R, axis=2))
    sizes = flash.BlockSizes(block_q=block_q, block_k_major=block_kv, block_k=block_kv, block_b=1,
                             block_q_major_dkv=block_q, block_k_major_dkv=block_kv, block_k_dkv=block_kv,
                             block_q_dkv=block_q, block_k_major_dq=block_kv, block_k_dq=block_kv, block_q_dq=block_q)
    out_BHTK = flash.flash_attention(heads_second(q_BTHK), k_BHTK, v_BHTK, segment_ids=flash.SegmentIds(seg_BT, seg_BT),
                                     causal=True, sm_scale=1.0, block_sizes=sizes)
    return heads_second(out_BHTK)


def _on_mesh(kernel, q_BTHK, k_BTGK, v_BTGK, seg_BT):
    """`kernel` per shard of batch and heads when a mesh is in context, else on the whole arrays."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q_BTHK, k_BTGK, v_BTGK, seg_BT)
    spec = lambda *names: PartitionSpec(*nn.logical_to_mesh_axes(names))  # noqa: E731 - context rules
    q_spec, kv_spec = spec("batch", "length", "heads", None), spec("batch", "length", "kv_heads", None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, spec("batch", "length")),
                         out_specs=q_spec, check_vma=False)(q_BTHK, k_BTGK, v_BTGK, seg_BT)


def causal_attention(name: str, q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, *, block_q: int = 512,
                     block_kv: int = 512):
    """Causal grouped-query self-attention of packed rows with implementation `name`: token t sees
    token s iff s <= t and both carry the same segment id. Queries must be pre-scaled."""
    check_config(name, block_q, block_kv)
    check_backend(name)
    if name == "xla":
        return attention.grouped_attention(q_BTHK, k_BTGK, v_BTGK, attention.causal_segment_mask(segment_ids_BT))
    if name == "cudnn":
        mask_B1TS = attention.causal_segment_mask(segment_ids_BT)[:, None]
        return jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, mask=mask_B1TS, scale=1.0, is_causal=True,
                                            implementation="cudnn")
    T = q_BTHK.shape[1]
    cap = _round_up(T, min(block_q, block_kv))  # shrink blocks for short rows; they still divide one another
    block_q, block_kv = min(block_q, cap), min(block_kv, cap)
    pad = _round_up(T, max(block_q, block_kv)) - T
    if pad:
        pad_x = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
        q_BTHK, k_BTGK, v_BTGK = pad_x(q_BTHK), pad_x(k_BTGK), pad_x(v_BTGK)
        segment_ids_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    impl = _splash if name == "splash" else _flash
    _, interpret = _platform()
    kernel = lambda q, k, v, s: impl(q, k, v, s, block_q, block_kv, interpret)  # noqa: E731
    out_BTHK = _on_mesh(kernel, q_BTHK, k_BTGK, v_BTGK, segment_ids_BT.astype(jnp.int32))
    return out_BTHK[:, :T]
