r"""Where one decode-heavy engine pass spends its time: host vs compiled step, and inside the step
attention, K/V write, matmuls, LM head and sampling, each timed as an isolated jitted program of
the pass's shapes (median of --reps runs).

  python benchmarks/profile_step.py [--model=small|large] [--decodes=64] [--context=96] [--trace]

`--trace` also records the compiled step with `jax.profiler` and sums the XLA:CPU thread time of
each of its operations per pass, grouped by kind (the K/V history gathers, the dots by output
shape, the rest), with the program's temporary memory and the page faults per pass: the
measured breakdown, where the pieces below are re-creations.

The pass: `--decodes` sequences each decoding one token after `--context` cached ones (SplitFuse
budget 256, block size 16, as in `serve.py`). "Step" is the engine's jitted `_device_step` (model
+ sampling, pool read-only) and "commit" its separate K/V write; "host" is the rest of
`Engine.step` (planning, batch building, transfers, bookkeeping). The pieces inside the step are
re-implemented here only to time them (they are not the engine's code), so they sum to about, not
exactly, the step: the difference is norms, RoPE, embedding, residuals and fusion effects.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxllm.model import llama
from jaxllm.serve import Engine, SamplingParams
from jaxllm.serve.paged_attention import paged_attention
from jaxllm.serve.sampling import sample

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  the benchmark models and engine settings

_MODEL = flags.DEFINE_enum("model", "small", ["small", "large"], "benchmark model of serve.py")
_DECODES = flags.DEFINE_integer("decodes", 64, "sequences decoding in the pass")
_CONTEXT = flags.DEFINE_integer("context", 96, "cached tokens per sequence")
_REPS = flags.DEFINE_integer("reps", 30, "timed runs per piece")
_CLOCK = flags.DEFINE_enum("clock", "cpu", ["cpu", "wall"], "cpu: process CPU time (all threads), robust to "
                           "other load on a shared machine; wall: elapsed time")


_TRACE = flags.DEFINE_bool("trace", False, "also break the compiled step down by XLA operation (jax.profiler trace)")


def median_time(fn, reps: int) -> float:
    clock = time.process_time if _CLOCK.value == "cpu" else time.perf_counter
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = clock()
        jax.block_until_ready(fn())
        times.append(clock() - start)
    return float(np.median(times))


def _fusion_kinds(hlo: str) -> dict[str, str]:
    """Kind of each operation of the entry computation: 'K/V history gather', 'dot -> <shape>' or
    'other' (from the fused computation it calls)."""
    bodies, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^%(\S+) .*\{$", line)
        if head:
            current = bodies.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    kinds = {}
    for line in hlo.split("ENTRY", 1)[-1].splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) fusion\(.*calls=%([\w.\-]+)", line)
        if m:
            body = "\n".join(bodies.get(m.group(3), []))
            kinds[m.group(1)] = ("K/V history gather" if " gather(" in body and "s32" not in m.group(2)
                                 and m.group(2).count(",") >= 3 else
                                 f"dot -> {m.group(2).split('{')[0]}" if " dot(" in body else "other")
    return kinds


def thunk_profile(fn, args: tuple, reps: int) -> dict:
    """Per pass of the jitted `fn(*args)`: XLA:CPU thread time and count of each kind of operation
    (from a jax.profiler trace of `reps` calls), the executions' wall time, the program's
    temporary memory and the process's minor page faults."""
    compiled = fn.lower(*args).compile()
    kinds = _fusion_kinds(compiled.as_text())
    jax.block_until_ready(fn(*args))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / reps
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
        with gzip.open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    per_kind = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e["name"] in kinds:
            entry = per_kind[kinds[e["name"]]]
            entry[0] += e["dur"] * 1e-6 / reps
            entry[1] += 1 / reps
    wall = [e["dur"] * 1e-6 for e in events if e["name"] == "ThunkExecutor::Execute (wait for completion)"]
    return {"kinds": dict(per_kind), "wall": float(np.median(wall)), "faults": faults,
            "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6}


def main(argv):
    del argv
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    cfg = serve.MODELS[_MODEL.value]
    params = llama.init_params(cfg, jax.random.key(0))
    B, C, reps = _DECODES.value, _CONTEXT.value, _REPS.value
    engine = Engine(cfg, params, **dict(serve.OFFLINE_ENGINE, max_seqs=max(64, B)))
    rng = np.random.default_rng(0)
    for _ in range(B):
        engine.add_request([int(x) for x in rng.integers(4, cfg.vocab_size, C)], SamplingParams(max_tokens=10_000 // C))
    while any(s.num_computed < C for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()  # warm the decode shape
    # host + device per engine.step, then the device pieces alone on the same plan
    step_total = median_time(engine.step, reps)
    plan = engine.scheduler.schedule()
    batches, offsets = engine._stream_batches(plan)
    rows = plan.sampling_rows()
    batches_d, offsets_d, rows_d = jax.device_put((batches, offsets, rows))
    out = engine._step_fn(engine.params, engine._pools, batches_d, offsets_d, rows_d, None)
    device = median_time(lambda: engine._step_fn(engine.params, engine._pools, batches_d, offsets_d, rows_d, None), reps)
    slots = tuple(b.slot_mapping_T for b in batches_d)

    def commit_once():
        engine._pools = engine._commit_fn(engine._pools, out[-1], slots)
        return engine._pools
    commit = median_time(commit_once, reps)

    T, S = plan.batch.tokens_T.shape[0], plan.batch.context_len_S.shape[0]
    D, H, G, K, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    key = jax.random.key(1)
    x_TD = jax.random.normal(key, (T, D))
    q_THK, k_TGK = jax.random.normal(key, (T, H, K)), jax.random.normal(key, (T, G, K))
    pool = engine._pools[0]
    # the engine slices layer i of the [L, ...] pool inside its jitted step; slicing here too
    # shows whether XLA copies the slice (compare with attention on a pre-sliced layer)
    attn = jax.jit(lambda q, k, v, kp, vp, b, o: paged_attention(q, k, v, kp[0], vp[0], b, o))
    attention = L * median_time(lambda: attn(q_THK, k_TGK, k_TGK, pool.k, pool.v, batches_d[0], offsets_d[0]), reps)
    k0, v0 = jax.block_until_ready((pool.k[0], pool.v[0]))
    attn_pre = jax.jit(paged_attention)
    attention_sliced = L * median_time(lambda: attn_pre(q_THK, k_TGK, k_TGK, k0, v0, batches_d[0], offsets_d[0]), reps)
    p = params["layers_0"]
    w = (p["attn"]["q"], p["attn"]["k"], p["attn"]["v"], p["attn"]["o"], p["mlp"]["gate"], p["mlp"]["up"],
         p["mlp"]["down"])

    @jax.jit
    def matmuls(x, wq, wk, wv, wo, wg, wu, wd):
        q = jnp.einsum("td,dhk->thk", x, wq)
        k = jnp.einsum("td,dgk->tgk", x, wk)
        v = jnp.einsum("td,dgk->tgk", x, wv)
        o = jnp.einsum("thk,hkd->td", q, wo)
        h = jax.nn.silu((x + o) @ wg) * (x @ wu)
        return h @ wd + k.sum() + v.sum()
    matmul = L * median_time(lambda: matmuls(x_TD, *w), reps)
    head = jax.jit(lambda x, w: jnp.einsum("sd,dv->sv", x, w, preferred_element_type=jnp.float32))
    x_SD = x_TD[:S] if S <= T else jnp.zeros((S, D))
    lm_head = median_time(lambda: head(x_SD, params["lm_head"]), reps)
    logits_SV = head(x_SD, params["lm_head"])
    sampler = jax.jit(sample)
    sampling = median_time(lambda: sampler(logits_SV, rows_d), reps)

    print(f"attention on a pre-sliced pool layer: {attention_sliced * 1e3:.2f} ms (all layers) vs "
          f"{attention * 1e3:.2f} ms slicing the [L, ...] pool inside the program")
    pieces = {"attention (all layers)": attention, "matmuls q/k/v/o + MLP (all layers)": matmul,
              "LM head": lm_head, "sampling": sampling}
    print(f"model {_MODEL.value} ({cfg.num_params():,} params), {B} decodes at context {C}: pass T={T}, S={S}, "
          f"table width {plan.batch.block_tables_SW.shape[1]} blocks; {_CLOCK.value} time, medians of {reps}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| part | ms | share of Engine.step |\n|---|---|---|")
    print(f"| Engine.step total | {step_total * 1e3:.2f} | 100% |")
    for name, t in [("compiled step (_device_step)", device), ("K/V write (commit)", commit),
                    ("host (rest of Engine.step)", step_total - device - commit)]:
        print(f"| {name} | {t * 1e3:.2f} | {t / step_total:.0%} |")
    for name, t in pieces.items():
        print(f"| · {name} | {t * 1e3:.2f} | {t / step_total:.0%} |")
    rest = device - sum(pieces.values())
    print(f"| · rest of the step (norms, RoPE, embedding, residuals, fusion) | {rest * 1e3:.2f} | {rest / step_total:.0%} |")
    if _TRACE.value:
        prof = thunk_profile(engine._step_fn, (engine.params, engine._pools, batches_d, offsets_d, rows_d, None), reps)
        total = sum(t for t, _ in prof["kinds"].values())
        print(f"\ncompiled step by XLA operation (jax.profiler, {reps} passes): wall {prof['wall'] * 1e3:.1f} ms per "
              f"pass, thread time {total * 1e3:.1f} ms (all threads); temporaries {prof['temp_mb']:.1f} MB; "
              f"{prof['faults']:.0f} minor page faults per pass")
        print("| operations | count per pass | thread ms per pass | share |\n|---|---|---|---|")
        for kind, (t, n) in sorted(prof["kinds"].items(), key=lambda kv: -kv[1][0]):
            print(f"| {kind} | {n:.0f} | {t * 1e3:.2f} | {t / total:.0%} |")


if __name__ == "__main__":
    app.run(main)
