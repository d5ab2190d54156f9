"""The peak FLOP/s that model FLOP/s are divided by to give MFU (model FLOPs utilisation).

Model FLOPs come from `jaxllm.model.flops` (MaxText's rule: 6 × (block matmul parameters + LM
head) + 6 × L × T × H × K causal attention, per token). TPUs and GPUs use their published dense
bfloat16 peak per chip (the MFU convention); CPUs have no such number, so their peak is measured
in-process as the best float32 `jnp.dot` rate.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Published dense bfloat16 peak FLOP/s per chip, matched as substrings of `device.device_kind`
# (lower-cased), most specific first.
PEAK_FLOPS_BF16 = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("a100", 312e12),
)


def measure_matmul_peak(n: int = 4096, repeats: int = 5, device=None) -> float:
    """Best float32 FLOP/s of an n×n `jnp.dot` on `device` (default: the first device)."""
    device = device or jax.devices()[0]
    a_NN = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), device)
    b_NN = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), device)
    dot = jax.jit(jnp.dot)
    dot(a_NN, b_NN).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a_NN, b_NN).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def table_peak(device) -> float | None:
    """Published peak FLOP/s of one accelerator chip, or None when the kind is not in the table."""
    kind = device.device_kind.lower()
    for key, peak in PEAK_FLOPS_BF16:
        if key in kind:
            return peak
    return None


def peak_flops(devices, measure_n: int = 2048) -> tuple[float, str]:
    """(Peak FLOP/s of all `devices` together, how it was obtained).

    Accelerators: table peak × number of chips. CPU devices (real or `--xla_force_host_platform_
    device_count` fakes) share the host's cores, so the peak is one measured matmul rate.
    """
    devices = list(devices)
    if devices[0].platform == "cpu":
        return measure_matmul_peak(measure_n, device=devices[0]), f"measured float32 {measure_n}² jnp.dot"
    peak = table_peak(devices[0])
    if peak is None:
        return measure_matmul_peak(measure_n, device=devices[0]) * len(devices), (
            f"measured {measure_n}² jnp.dot (device kind {devices[0].device_kind!r} not in the peak table)")
    return peak * len(devices), f"table bf16 peak of {devices[0].device_kind!r} × {len(devices)}"
