r"""The large benchmark model's MLP block (SwiGLU, d_model 512, d_ff 1536, float32) at a decode
pass's token counts, in torch (HF's matmuls: oneDNN) and in one jitted JAX program under each
XLA:CPU flag set that could change how its dots are compiled. Each arm runs in its own process
(XLA reads its flags once), interleaved over --rounds; wall-clock medians.

  python benchmarks/matmul_flags.py [--tokens=64,256] [--rounds=3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

FLAG_SETS = {
    "XLA default": "",
    "oneDNN": "--xla_cpu_use_onednn=true",
    "XNNPACK": "--xla_cpu_use_xnnpack=true",
    "XNN graph fusion (greedy)": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "XNN graph fusion (greedy, slinky)":
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY",
    "fast math": "--xla_cpu_enable_fast_math=true",
}
D, F = 512, 1536


def median_ms(fn, reps: int = 100) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def arm(kind: str, tokens: int) -> float:
    """Milliseconds of one MLP block over `tokens` tokens (runs in a child process)."""
    rng = np.random.default_rng(0)
    shapes = [(tokens, D), (D, F), (D, F), (F, D)]
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if kind == "torch":
        import torch
        x, gate, up, down = (torch.from_numpy(a) for a in arrays)
        with torch.inference_mode():
            return median_ms(lambda: (torch.nn.functional.silu(x @ gate) * (x @ up)) @ down)
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    x, gate, up, down = (jnp.asarray(a) for a in arrays)
    mlp = jax.jit(lambda x, gate, up, down: (jax.nn.silu(x @ gate) * (x @ up)) @ down)
    return median_ms(lambda: mlp(x, gate, up, down).block_until_ready())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="64,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(arm(args.child[0], int(args.child[1]))))
        return
    arms = {"torch (HF's matmuls)": ("torch", "")} | {name: ("jax", flags) for name, flags in FLAG_SETS.items()}
    tokens = [int(t) for t in args.tokens.split(",")]
    times = {(name, t): [] for name in arms for t in tokens}
    for _ in range(args.rounds):
        for t in tokens:
            for name, (kind, flags) in arms.items():
                env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(t)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                times[name, t].append(json.loads(out.strip().splitlines()[-1]))
    print(f"MLP block (d_model {D}, d_ff {F}, float32), median ms over {args.rounds} rounds of 100 calls; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| arm | XLA_FLAGS | " + " | ".join(f"{t} tokens" for t in tokens) + " |")
    print("|---|---|" + "---|" * len(tokens))
    for name, (_, flags) in arms.items():
        cells = [f"{np.median(times[name, t]):.2f}" for t in tokens]
        print(f"| {name} | `{flags}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
