r"""Cost of the engine's paged attention against the block-table width it is padded to: one layer,
64 decodes of history 140 (9 blocks of 16), the same keys at widths 9–24 blocks, timed interleaved
in one process (medians of --reps); the outputs are checked equal across widths (float32 order).

  python benchmarks/attention_width.py [--head_dim=32]   # 32: serve.py's small model, 64: large

Every decode reads its whole table, so this is what a finer context bucket saves per layer.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxllm.serve.cache import RaggedBatch
from jaxllm.serve.paged_attention import paged_attention

_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "head dimension (8 query heads, 2 KV heads as in serve.py)")
_REPS = flags.DEFINE_integer("reps", 40, "timed runs per width")
WIDTHS, HISTORY, DECODES, NUM_BLOCKS, BLOCK = (9, 10, 12, 16, 24), 140, 64, 2048, 16


def main(argv):
    del argv
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    K, H, G, T = _HEAD_DIM.value, 8, 2, DECODES
    k_NPGK = jax.random.normal(jax.random.key(0), (NUM_BLOCKS, BLOCK, G, K))
    v_NPGK = jax.random.normal(jax.random.key(1), (NUM_BLOCKS, BLOCK, G, K))
    q_THK, k_TGK = jax.random.normal(jax.random.key(2), (T, H, K)), jax.random.normal(jax.random.key(3), (T, G, K))
    used = -(-HISTORY // BLOCK)
    blocks_TU = np.random.default_rng(0).permutation(NUM_BLOCKS)[:T * used].reshape(T, used)
    rows_T = np.arange(T, dtype=np.int32)
    offset_S = jnp.zeros(T, jnp.int32)
    attend = jax.jit(paged_attention)
    batches = {}
    for W in WIDTHS:
        tables_SW = np.full((T, W), -1, np.int32)
        tables_SW[:, :used] = blocks_TU
        batches[W] = jax.device_put(RaggedBatch(np.zeros(T, np.int32), np.full(T, HISTORY, np.int32), rows_T, rows_T,
                                                tables_SW, np.full(T, HISTORY + 1, np.int32), rows_T, np.ones(T, bool)))
    outs = {W: np.asarray(attend(q_THK, k_TGK, k_TGK, k_NPGK, v_NPGK, batches[W], offset_S)) for W in WIDTHS}
    times = {W: ([], []) for W in WIDTHS}
    for _ in range(_REPS.value):
        for W in WIDTHS:
            cpu, wall = time.process_time(), time.perf_counter()
            jax.block_until_ready(attend(q_THK, k_TGK, k_TGK, k_NPGK, v_NPGK, batches[W], offset_S))
            times[W][0].append(time.process_time() - cpu)
            times[W][1].append(time.perf_counter() - wall)
    print(f"head_dim {K}, {T} decodes at history {HISTORY} ({used} blocks), one layer; medians of {_REPS.value}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| table width (blocks) | CPU ms | wall ms | max abs diff vs narrowest |\n|---|---|---|---|")
    for W in WIDTHS:
        diff = float(np.abs(outs[W] - outs[WIDTHS[0]]).max())
        print(f"| {W} | {np.median(times[W][0]) * 1e3:.2f} | {np.median(times[W][1]) * 1e3:.2f} | {diff:.0e} |")


if __name__ == "__main__":
    app.run(main)
