r"""Model FLOPs utilisation of the training step, measured against this machine's matmul peak.

  python benchmarks/train_mfu.py                       # d_model 128 / 256 / 512, batch 16 x 256
  python benchmarks/train_mfu.py --sizes=512 --batch=32 --remat=full --scan_layers

Paired measurement: each timed training step is followed, in the same process, by a peak
measurement (the best of 2 float32 4096×4096 `jnp.dot`s), and MFU is the median over the pairs of
(model FLOP/s of the step / that peak). On a shared machine whose load drifts, each ratio compares
two rates measured seconds apart; the medians of the step time and of the peak are shown too.
A step is the real `jaxllm.train` step (forward, backward, AdamW with clipping and masked weight
decay) on a 1-device mesh; the first two steps (compilation, warm-up) are not timed.

FLOP rule (MaxText's, `jaxllm.model.flops`): per token 6 × (block matmul parameters + d_model ×
vocab) + 6 × n_layers × seq_len × n_heads × head_dim (causal attention); norms, softmax, the
optimizer and rematerialisation are not counted. Prints one markdown row per size, MFU as a ratio.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxllm.model import flops, llama, presets
from jaxllm.parallel import make_mesh
from jaxllm.train import lm, mfu, optim
from jaxllm.train.config import TrainConfig
from jaxllm.train.loop import init_train_state
from jaxllm.train.step import make_train_step

_SIZES = flags.DEFINE_list("sizes", ["128", "256", "512"], "d_model of each model; layers = d_model / 64, "
                           "heads of 64, kv heads = heads / 2, d_ff = 3 d_model")
_BATCH = flags.DEFINE_integer("batch", 16, "rows per step")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "tokens per row")
_VOCAB = flags.DEFINE_integer("vocab", 4096, "vocabulary size (the shipped tokenizer's)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed (step, peak) pairs per model, after 2 untimed steps")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "rematerialisation policy")
_SCAN = flags.DEFINE_bool("scan_layers", False, "stack the blocks under one lax.scan")
_PEAK_N = flags.DEFINE_integer("peak_n", 4096, "matmul size for the peak measurement")


def model_config(d_model: int):
    heads = max(d_model // 64, 2)
    return presets.get("small", vocab_size=_VOCAB.value, d_model=d_model, n_layers=d_model // 64, n_heads=heads,
                       n_kv_heads=heads // 2, d_ff=3 * d_model, max_len=max(_SEQ_LEN.value, 1024),
                       remat=_REMAT.value, scan_layers=_SCAN.value)


def packed_batch(rng, B: int, T: int, vocab: int) -> dict:
    """One document per row: the shapes and masks of a real packed batch."""
    mask = np.ones((B, T), np.float32)
    mask[:, 0] = 0
    return {"tokens": jnp.asarray(rng.integers(4, vocab, (B, T)), jnp.int32),
            "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
            "loss_mask": jnp.asarray(mask)}


def paired_rates(cfg, mesh, device) -> tuple[list[float], list[float]]:
    """(step seconds, peak FLOP/s) of `_STEPS` pairs: one training step, then one peak measurement."""
    train_cfg = TrainConfig(model=cfg, batch_size=_BATCH.value, seq_len=_SEQ_LEN.value, steps=_STEPS.value + 2)
    optimizer, _ = optim.make_optimizer(train_cfg.optimizer, train_cfg.steps)
    state = init_train_state(lambda rng: llama.init_params(cfg, rng, boxed=True), optimizer, mesh, train_cfg.seed)
    step = make_train_step(lm.lm_loss_fn(cfg), optimizer, mesh)
    batch = packed_batch(np.random.default_rng(0), _BATCH.value, _SEQ_LEN.value, cfg.vocab_size)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds, peaks = [], []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - start)
        peaks.append(mfu.measure_matmul_peak(_PEAK_N.value, repeats=2, device=device))
    return seconds, peaks


def main(argv):
    del argv
    device = jax.devices()[0]
    mesh = make_mesh("fsdp:1", [device])
    print(f"device {device.device_kind}; batch {_BATCH.value} x {_SEQ_LEN.value}, remat {_REMAT.value}, "
          f"scan_layers {_SCAN.value}; peak = float32 {_PEAK_N.value}² jnp.dot after each timed step")
    print("| d_model | layers | heads/kv | d_ff | params (non-emb) | step s | tokens/s | model GFLOP/s "
          "| peak GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d_model in map(int, _SIZES.value):
        cfg = model_config(d_model)
        step_flops = flops.train_flops_per_token(cfg, _SEQ_LEN.value) * _BATCH.value * _SEQ_LEN.value
        seconds, peaks = paired_rates(cfg, mesh, device)
        ratio = np.median([step_flops / s / p for s, p in zip(seconds, peaks)])
        step_s = float(np.median(seconds))
        print(f"| {cfg.d_model} | {cfg.n_layers} | {cfg.n_heads}/{cfg.n_kv_heads} | {cfg.d_ff} | "
              f"{cfg.num_params(include_embedding=False) / 1e6:.2f}M | {step_s:.3f} | "
              f"{_BATCH.value * _SEQ_LEN.value / step_s:,.0f} | {step_flops / step_s / 1e9:.1f} | "
              f"{np.median(peaks) / 1e9:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
