r"""SplitFuse vs prefill-first vs static batching in simulated time (`jaxllm.serve.simulate`): the
real `Scheduler` of every policy, each pass priced by a roofline model of the hardware.

  python benchmarks/simulate_splitfuse.py                 # ~15 min on 2 shared cores (load 10-16)
  python benchmarks/simulate_splitfuse.py --nocpu         # accelerators only (no JAX timing)

Accelerators (DeepSpeed-FastGen's setting, arXiv 2401.08671): Llama-2-70B on 4×A100-80GB, tensor
parallel, float16 weights and K/V; and on a TPU v5e-8 with int8 weights (70 GB; bfloat16 would not
fit 8 × 16 GB) and bfloat16 K/V. FastGen's engine settings: token budget 768 per pass, at most 512
sequences, KV blocks of 64 tokens, passes padded to a multiple of 64 tokens up to 512 and of 128
above. Prefill-first (vLLM v0's default, the paper's baseline) and static batching need a budget
holding the longest prompt + output: max_model_len, as vLLM sets it.

Workloads (FastGen's): prompt/output lengths ~ Normal(mean, 0.3 mean), prompts capped at 4000,
means (2600, 60), (2600, 128) and the short/long parity case (256, 256); closed-loop clients
{1, 2, 4, 8, 12, 16, 24, 32} (FastGen's client) and open-loop Poisson arrivals at
fractions of SplitFuse's saturation rate. SLA (FastGen): TTFT <= prompt / 512 s and the EMA
(span 16) of a request's inter-token latencies < 1/4 s (4 tokens/s; 2 and 6 in the JSON).
Effective throughput = req/s × fraction meeting the SLA, peak over loads.

CPU check: the 3.4M-parameter model of `benchmarks/serve.py` runs through the real `Engine` on
this machine; its pass time is measured against tokens per pass (one prompt of T tokens; B
decodes) and compared with the roofline under CPU parameters measured here (float32 matmul peak
of `jnp.dot`, read bandwidth of a reduction), with the per-pass overhead and sustained fraction fitted.
The same fit on the cost curve recorded in `results/serve.json` then replays that run's long-prompt
workload (its arms, requests and load fractions) in simulation, next to its measured results.

Writes simulate_splitfuse.{md,json} and simulate_splitfuse_{cost,latency,effective}.png to --out.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from jaxllm.model import presets
from jaxllm.serve import sla
from jaxllm.serve.scheduler import SchedulerConfig
from jaxllm.serve.simulate import Hardware, ModelCost, SimRequest, pass_cost, plan_cost, poisson_requests, simulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  the CPU benchmark's model, engine arms and workloads; defines --out and --seed

_OUT, _SEED = serve._OUT, serve._SEED
_REQUESTS = flags.DEFINE_integer("sim_requests", 128, "requests per simulated run (FastGen: 512)")
_CPU = flags.DEFINE_bool("cpu", True, "measure the engine's CPU cost curve and fit the CPU model")

LLAMA2_70B = presets.get("llama2_70b")
GB = 1e9
# Datasheets: A100-80GB SXM 312 TFLOP/s dense fp16, 2.039 TB/s HBM2e, NVLink 3 600 GB/s (300 each
# way); TPU v5e 197 TFLOP/s bf16, 819 GB/s HBM, 16 GB, ICI 1600 Gbps (100 GB/s each way assumed).
# Achievable fractions (0.6 of peak FLOP/s, 0.8 of HBM bandwidth) and per-pass overheads are
# assumptions (launches, host planning, 160 all-reduce latencies), not measurements.
ACCELERATORS = {
    "A100-80GB x4": dict(
        hw=Hardware("A100-80GB x4", 312e12, 2.039e12, devices=4, link_bandwidth=300e9, pass_overhead_s=5e-3,
                    compute_efficiency=0.6, memory_efficiency=0.8),
        model=ModelCost(LLAMA2_70B, weight_bytes=2, kv_bytes=2, act_bytes=2), memory=4 * 80 * GB),
    "TPU v5e-8": dict(
        hw=Hardware("TPU v5e-8", 197e12, 819e9, devices=8, link_bandwidth=100e9, pass_overhead_s=3e-3,
                    compute_efficiency=0.6, memory_efficiency=0.8),
        model=ModelCost(LLAMA2_70B, weight_bytes=1, kv_bytes=2, act_bytes=2), memory=8 * 16 * GB),
}
RESERVE_PER_DEVICE = 4 * GB  # FastGen keeps 1 GB free; plus activations and workspace
BLOCK, MAX_SEQS, BUDGET, PROMPT_CAP = 64, 512, 768, 4000
WORKLOADS = {"2600/60": (2600, 60), "2600/128": (2600, 128), "256/256": (256, 256)}
CLIENTS = (1, 2, 4, 8, 12, 16, 24, 32)
RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SLA_RATES = (2.0, 4.0, 6.0)  # generation tokens/s
PREFILL_RATE = 512.0  # prompt tokens/s
POLICIES = ("splitfuse", "prefill_first", "static")
FASTGEN = {"effective throughput (2600/60, 4 tok/s SLA)": 2.3, "p95 token latency (2600/128, 16 clients)": 3.7}


def fastgen_buckets(budget: int) -> tuple[int, ...]:
    """FastGen's input padding: multiples of 64 up to 512, of 128 above, and the budget."""
    sizes = list(range(64, min(budget, 512) + 1, 64)) + list(range(640, budget + 1, 128))
    return tuple(sorted({s for s in sizes if s < budget} | {budget}))


def scheduler_config(policy: str, num_blocks: int, max_model_len: int) -> SchedulerConfig:
    budget = BUDGET if policy == "splitfuse" else max_model_len
    return SchedulerConfig(num_blocks=num_blocks, policy=policy, token_budget=budget, max_seqs=MAX_SEQS,
                           block_size=BLOCK, buckets=fastgen_buckets(budget), prefix_caching=False,
                           max_model_len=max_model_len)


def summarize(records: list[dict]) -> dict:
    return sla.summarize(records, PREFILL_RATE, {f"{r:g}tok/s": 1.0 / r for r in SLA_RATES})


def cost_curve(model: ModelCost, hw: Hardware) -> dict:
    """Pass time (s) for one prompt of T tokens, and for B decodes at context 2600."""
    prompt = {T: pass_cost(model, hw, T, [T], [0]).seconds for T in (1, 16, 64, 128, 256, 512, 768, 1024, 2048, 4096)}
    decode = {B: pass_cost(model, hw, B, [1] * B, [2600] * B).seconds for B in (1, 8, 16, 32, 64)}
    return {"prompt": prompt, "decode": decode}


def run_accelerator(name: str, spec: dict, n: int, seed: int) -> dict:
    hw, model = spec["hw"], spec["model"]
    weights = LLAMA2_70B.num_params() * model.weight_bytes
    kv_bytes = spec["memory"] - weights - hw.devices * RESERVE_PER_DEVICE
    num_blocks = int(kv_bytes // (model.kv_bytes_per_token * BLOCK))
    out = {"num_blocks": num_blocks, "kv_tokens": num_blocks * BLOCK, "cost_curve": cost_curve(model, hw),
           "workloads": {}}
    price = lambda plan: plan_cost(model, hw, plan).seconds  # noqa: E731
    for wname, (p_mean, g_mean) in WORKLOADS.items():
        max_model_len = PROMPT_CAP + 3 * g_mean
        cfgs = {p: scheduler_config(p, num_blocks, max_model_len) for p in POLICIES}
        base = poisson_requests(np.random.default_rng(seed), n, math.inf, p_mean, g_mean, PROMPT_CAP)
        sat = simulate(cfgs["splitfuse"], base, price)
        capacity = summarize(sat.records)["req_s"]
        w = {"saturation_req_s": capacity, "closed": {p: {} for p in POLICIES}, "open": {p: {} for p in POLICIES},
             "pass_tokens": {}}
        for policy, cfg in cfgs.items():
            for c in CLIENTS:
                res = simulate(cfg, base, price, clients=c)
                w["closed"][policy][c] = summarize(res.records)
                if c == 16:
                    w["pass_tokens"][policy] = np.histogram(res.pass_tokens, bins=[1, 2, 65, 257, 769, 2049, 8193]
                                                            )[0].tolist()
            for f in RATE_FRACTIONS:
                rate = f * capacity
                reqs = poisson_requests(np.random.default_rng(seed), n, rate, p_mean, g_mean, PROMPT_CAP)
                w["open"][policy][round(rate, 4)] = summarize(simulate(cfg, reqs, price).records)
        out["workloads"][wname] = w
        print(f"{name} {wname} done", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- CPU check

def measure_cpu() -> dict:
    """Engine pass times on this machine for the serve.py model, and the roofline inputs."""
    import jax
    import jax.numpy as jnp

    from jaxllm.model import llama
    from jaxllm.serve import Engine, SamplingParams

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    model = serve.MODEL
    params = llama.init_params(model, jax.random.key(0))
    buckets = (16, 32, 64, 128, 256, 512)
    engine = Engine(model, params, **dict(serve.ENGINE_COMMON, max_seqs=64), policy="prefill_first",
                    token_budget=512, buckets=buckets)
    rng = np.random.default_rng(0)
    prompt = {}
    for T in buckets:  # one prompt filling bucket T (the first run compiles; medians of 7)
        times = []
        for _ in range(7):
            n = min(T, model.max_len - 1)
            engine.add_request([int(x) for x in rng.integers(4, model.vocab_size, n)], SamplingParams(max_tokens=1))
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        prompt[T] = float(np.median(times))
    decode = {}
    for B in (1, 4, 16, 64):
        for _ in range(B):
            engine.add_request([int(x) for x in rng.integers(4, model.vocab_size, 32)], SamplingParams(max_tokens=24))
        engine.step()  # the prompts
        times = []
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        decode[B] = float(np.median(times))
    a = jnp.ones((2048, 2048), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    peak = max(2 * 2048**3 / _timed(lambda: dot(a).block_until_ready()) for _ in range(5))
    big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MB, read once by a reduction
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    bandwidth = max(big.nbytes / _timed(lambda: total(big).block_until_ready()) for _ in range(5))
    return {"prompt": prompt, "decode": decode, "peak_flops": peak, "bandwidth": bandwidth,
            "decode_context": 32 + 12}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fit_cpu(measured: dict) -> dict:
    """Least-squares fit of measured = overhead + a x roofline(peak, bandwidth) over the measured
    passes: the CPU sustains 1 / a of the measured peaks in a pass (`efficiency`, may exceed 1 when
    the peaks were measured under more load than the passes)."""
    model = ModelCost(serve.MODEL, weight_bytes=4, kv_bytes=4, act_bytes=4)
    hw = Hardware("CPU (measured peaks)", measured["peak_flops"], measured["bandwidth"])
    cases = [(T, [min(T, serve.MODEL.max_len - 1)], [0]) for T in measured["prompt"]]
    decode = measured.get("decode", {})
    cases += [(max(16, 1 << (B - 1).bit_length()), [1] * B, [measured["decode_context"]] * B) for B in decode]
    y = np.array(list(measured["prompt"].values()) + list(decode.values()))
    roof = np.array([pass_cost(model, hw, *c).seconds for c in cases])
    slope, overhead = np.linalg.lstsq(np.stack([roof, np.ones_like(roof)], 1), y, rcond=None)[0]
    if overhead < 0:  # no negative overheads: fit the slope alone
        slope, overhead = float(roof @ y / (roof @ roof)), 0.0
    efficiency = float(1.0 / slope)
    fitted = Hardware("CPU (fitted)", measured["peak_flops"] * efficiency, measured["bandwidth"] * efficiency,
                      pass_overhead_s=overhead)
    pred = np.array([pass_cost(model, fitted, *c).seconds for c in cases])
    labels = [f"prompt T={T}" for T in measured["prompt"]] + [f"{B} decodes" for B in decode]
    return {"efficiency": efficiency, "overhead_s": float(overhead), "hw": fitted, "model": model,
            "rows": [{"pass": lab, "measured_ms": m * 1e3, "roofline_ms": r * 1e3, "fitted_ms": p * 1e3,
                      "bound": pass_cost(model, fitted, *c).bound}
                     for lab, m, r, p, c in zip(labels, y, roof, pred, cases)]}


def replay_cpu_serve(fit: dict) -> dict:
    """serve.py's long-prompt online runs (its arms, requests and arrival rates, from
    results/serve.json) replayed in simulation with the fitted CPU model. The SLA is scaled as
    serve.py scales it, from the model's own isolated decode step and prefill pass."""
    measured = json.loads((pathlib.Path(__file__).parent / "results" / "serve.json").read_text())
    model, hw = fit["model"], fit["hw"]
    price = lambda plan: plan_cost(model, hw, plan).seconds  # noqa: E731
    longest = serve.MODEL.max_len - 1
    sla = {"t_dec": pass_cost(model, hw, 16, [1], [48]).seconds,
           "prefill_rate": longest / pass_cost(model, hw, 512, [longest], [0]).seconds / 4}
    n, seed = serve._REQUESTS.default, serve._SEED.default

    def requests(rate):
        return [SimRequest(r["arrival"], len(r["prompt"]), r["max_tokens"])
                for r in serve.workload("long_prompt", n, rate, seed)]

    cfgs = {}
    for arm in ("splitfuse", "splitfuse B=64", "prefill_first"):
        kw = dict(serve.ENGINE_COMMON, **serve.ARMS[arm])
        cfgs[arm] = SchedulerConfig(num_blocks=kw["num_blocks"], policy=kw["policy"], token_budget=kw["token_budget"],
                                    max_seqs=kw["max_seqs"], block_size=kw["block_size"], buckets=kw["buckets"],
                                    prefix_caching=False, max_model_len=serve.MODEL.max_len)
    # rates: the same fractions of (simulated) SplitFuse saturation as serve.py used of its measured one
    capacity = serve.summarize(simulate(cfgs["splitfuse"], requests(math.inf), price).records, sla)["req_s"]
    out = {}
    for arm, cfg in cfgs.items():
        out[arm] = {}
        for fraction, meas_rate in zip(measured["rate_fractions"], measured["rates"]["long_prompt"]):
            s = serve.summarize(simulate(cfg, requests(fraction * capacity), price).records, sla)
            m = measured["online"]["long_prompt"][f"engine {arm}"][str(meas_rate)]
            out[arm][fraction] = {"sim_itl_p95": s["itl_p95"], "meas_itl_p95": m["itl_p95"],
                                  "sim_eff": s["eff_req_s_0.25"], "meas_eff": m["eff_req_s_0.25"]}
    return {"sla": sla, "arms": out}


# ----------------------------------------------------------------------------- report

def headline(acc: dict) -> dict:
    """Per accelerator: the paper's two ratios (SplitFuse vs prefill-first), closed loop and open."""
    out = {}
    for name, r in acc.items():
        w60, w128 = r["workloads"]["2600/60"], r["workloads"]["2600/128"]
        eff = {mode: {p: max(s["eff_req_s_4tok/s"] for s in w60[mode][p].values()) for p in POLICIES}
               for mode in ("closed", "open")}
        p95 = {p: w128["closed"][p][16]["itl_p95"] for p in POLICIES}
        p50 = {p: w128["closed"][p][16]["itl_p50"] for p in POLICIES}
        out[name] = {"eff_closed": eff["closed"], "eff_open": eff["open"], "itl_p95_16": p95, "itl_p50_16": p50,
                     "eff_ratio_closed": _ratio(eff["closed"]["splitfuse"], eff["closed"]["prefill_first"]),
                     "eff_ratio_open": _ratio(eff["open"]["splitfuse"], eff["open"]["prefill_first"]),
                     "p95_ratio": _ratio(p95["prefill_first"], p95["splitfuse"])}
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def f3(x: float, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x * scale:,.{digits}f}"


def markdown(result: dict) -> str:
    env, acc, heads = result["env"], result["accelerators"], result["headline"]
    lines = ["# SplitFuse in simulated time (`benchmarks/simulate_splitfuse.py`)", "",
             f"Run {env['date']}; command: `{env['command']}`; took {env['wall_s'] / 60:.1f} min on a shared "
             f"{env['cpus']}-core machine (simulated times do not depend on its load; the CPU cost curve does). "
             f"{env['requests']} requests per run, seed {env['seed']}.", "",
             "The real `Scheduler` of each policy plans every pass; `jaxllm.serve.simulate.pass_cost` prices it "
             "(roofline: max(FLOPs / achievable FLOP/s, HBM bytes / achievable bandwidth) + tensor-parallel "
             "all-reduces + a fixed overhead). Hardware parameters: datasheet peaks, 0.6 of peak FLOP/s and 0.8 of "
             "HBM bandwidth achievable, per-pass overhead 5 ms (A100 ×4) / 3 ms (v5e-8): assumptions, not "
             "measurements. SLA (FastGen): TTFT ≤ prompt / 512 s, EMA of ITLs < 1/4 s.", "",
             "## Headline: FastGen's ratios next to the simulated ones (SplitFuse B=768 vs prefill-first)", "",
             "| | FastGen paper (vs vLLM) | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads),
             "| effective throughput, 2600/60, 4 tok/s SLA, peak over 1–32 clients | 2.3× | "
             + " | ".join(f"{h['eff_ratio_closed']:.2f}× ({f3(h['eff_closed']['splitfuse'])} vs "
                          f"{f3(h['eff_closed']['prefill_first'])} req/s)" for h in heads.values()) + " |",
             "| same, open-loop Poisson, peak over rates | — | "
             + " | ".join(f"{h['eff_ratio_open']:.2f}× ({f3(h['eff_open']['splitfuse'])} vs "
                          f"{f3(h['eff_open']['prefill_first'])} req/s)" for h in heads.values()) + " |",
             "| p95 token latency (ITL), 2600/128, 16 clients: prefill-first ÷ SplitFuse | 3.7× | "
             + " | ".join(f"{h['p95_ratio']:.2f}× ({f3(h['itl_p95_16']['prefill_first'], 1e3, 0)} vs "
                          f"{f3(h['itl_p95_16']['splitfuse'], 1e3, 0)} ms)" for h in heads.values()) + " |",
             "| p50 ITL, same run (paper: similar) | similar | "
             + " | ".join(f"{f3(h['itl_p50_16']['prefill_first'], 1e3, 0)} vs "
                          f"{f3(h['itl_p50_16']['splitfuse'], 1e3, 0)} ms" for h in heads.values()) + " |", ""]
    lines += ["## Pass cost curves (ms)", "",
              "| hardware | prompt T=" + " / ".join(str(t) for t in next(iter(acc.values()))["cost_curve"]["prompt"])
              + " | decodes B=" + " / ".join(str(b) for b in next(iter(acc.values()))["cost_curve"]["decode"])
              + " at context 2600 |", "|---|---|---|"]
    for name, r in acc.items():
        c = r["cost_curve"]
        lines.append(f"| {name} | " + " / ".join(f"{v * 1e3:.0f}" for v in c["prompt"].values()) + " | "
                     + " / ".join(f"{v * 1e3:.1f}" for v in c["decode"].values()) + " |")
    lines += ["", "KV pool: " + ", ".join(f"{n}: {r['num_blocks']:,} blocks of {BLOCK} ({r['kv_tokens']:,} tokens)"
                                          for n, r in acc.items()) + ".", ""]
    if "cpu" in result:
        cpu = result["cpu"]
        lines += ["## CPU check: the roofline against the engine's measured pass times", "",
                  f"This machine: `jnp.dot` float32 peak {cpu['measured']['peak_flops'] / 1e9:.0f} GFLOP/s, "
                  f"read bandwidth (a reduction over 256 MB) {cpu['measured']['bandwidth'] / 1e9:.1f} GB/s. Fitted: achievable fraction "
                  f"{cpu['efficiency']:.2f} of both sustained in a pass, per-pass overhead {cpu['overhead_s'] * 1e3:.2f} ms "
                  "(model: serve.py's 3.4M-parameter Llama, float32; decodes at context ~44).", "",
                  "| pass | measured ms | roofline at peak ms | fitted ms | bound |", "|---|---|---|---|---|"]
        for row in cpu["rows"]:
            lines.append(f"| {row['pass']} | {row['measured_ms']:.2f} | {row['roofline_ms']:.2f} | "
                         f"{row['fitted_ms']:.2f} | {row['bound']} |")
        sj = cpu["serve_json_fit"]
        lines += ["", "The same fit on the cost curve that `results/serve.json` recorded (another machine and day, "
                  f"the run whose online results are replayed below): achievable fraction {sj['efficiency']:.2f}, "
                  f"overhead {sj['overhead_s'] * 1e3:.2f} ms; measured / fitted ms: "
                  + ", ".join(f"{r['pass'][7:]}: {r['measured_ms']:.1f} / {r['fitted_ms']:.1f}" for r in sj["rows"]) + ".",
                  "", "serve.py's long-prompt (260, 13) online runs replayed in simulation with that fit, vs measured "
                  "in `results/serve.json`:", "",
                  "| arm | load (fraction of SplitFuse saturation) | p95 ITL sim / measured ms | eff. req/s (f = 1/4) "
                  "sim / measured |",
                  "|---|---|---|---|"]
        arms = cpu["replay"]["arms"]
        for arm, rates in arms.items():
            for rate, v in rates.items():
                lines.append(f"| {arm} | {rate} | {v['sim_itl_p95'] * 1e3:.1f} / {v['meas_itl_p95'] * 1e3:.1f} | "
                             f"{v['sim_eff']:.2f} / {v['meas_eff']:.2f} |")
        sla = cpu["replay"]["sla"]
        lines += ["", f"Simulated SLA scaled as serve.py scales it: t_dec = {sla['t_dec'] * 1e3:.2f} ms, R_p = "
                  f"{sla['prefill_rate']:,.0f} tokens/s. p95 ITL ratio SplitFuse ÷ prefill-first per rate, "
                  "simulated vs measured:", ""]
        for arm in [a for a in arms if a != "prefill_first"]:
            lines.append(f"- {arm}: " + ", ".join(
                f"{r}: {v['sim_itl_p95'] / arms['prefill_first'][r]['sim_itl_p95']:.2f}× vs "
                f"{v['meas_itl_p95'] / arms['prefill_first'][r]['meas_itl_p95']:.2f}×" for r, v in arms[arm].items()))
        lines.append("")
    for name, r in acc.items():
        lines += [f"## {name}: all runs", ""]
        for wname, w in r["workloads"].items():
            lines += [f"### {wname} (SplitFuse saturation {w['saturation_req_s']:.2f} req/s; pass-token histogram at "
                      "16 clients, bins 1 / 2–64 / 65–256 / 257–768 / 769–2048 / > 2048: "
                      + "; ".join(f"{p} {h}" for p, h in w["pass_tokens"].items()) + ")", "",
                      "| policy | load | req/s | tok/s | TTFT p50 / p95 s | ITL p50 / p95 / p99 ms | SLA 2 / 4 / 6 tok/s "
                      "| eff. req/s at 4 tok/s |", "|---|---|---|---|---|---|---|---|"]
            for mode, unit in (("closed", "clients"), ("open", "req/s")):
                for policy in POLICIES:
                    for load, s in w[mode][policy].items():
                        lines.append(
                            f"| {policy} | {load} {unit} | {s['req_s']:.3f} | {s['tok_s']:.0f} | "
                            f"{s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | {f3(s['itl_p50'], 1e3, 0)} / "
                            f"{f3(s['itl_p95'], 1e3, 0)} / {f3(s['itl_p99'], 1e3, 0)} | "
                            + " / ".join(f"{s[f'sla_{g:g}tok/s'] * 100:.0f}%" for g in SLA_RATES)
                            + f" | {s['eff_req_s_4tok/s']:.3f} |")
            lines.append("")
    return "\n".join(lines)


def plots(result: dict, out: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    acc = result["accelerators"]
    # 1. cost curves, normalised to the 1-token (or smallest) pass
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, r in acc.items():
        c = r["cost_curve"]["prompt"]
        ax.plot(list(c), np.array(list(c.values())) / c[1], "o-", label=f"{name} (roofline)")
    if "cpu" in result:
        m = result["cpu"]["measured"]["prompt"]
        T0 = min(m)
        ax.plot(list(m), np.array(list(m.values())) / m[T0], "s-", label=f"CPU engine, measured (÷ T={T0})")
        fit = {r["pass"]: r["fitted_ms"] for r in result["cpu"]["rows"]}
        ax.plot(list(m), [fit[f"prompt T={T}"] / fit[f"prompt T={T0}"] for T in m], "s--", label="CPU roofline, fitted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the pass (one prompt)")
    ax.set_ylabel("pass time ÷ smallest pass")
    ax.set_title("Cost of one pass vs its tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "simulate_splitfuse_cost.png", dpi=110)
    # 2. latency vs throughput (closed loop, 2600/128) per accelerator, plus the measured CPU runs
    measured = json.loads((pathlib.Path(__file__).parent / "results" / "serve.json").read_text())
    cols = len(acc) + 1
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8), squeeze=False)
    for col, (name, r) in enumerate(acc.items()):
        w = r["workloads"]["2600/128"]
        for policy in POLICIES:
            pts = sorted((s["tok_s"], s["itl_p95"] * 1e3, s["itl_p50"] * 1e3) for s in w["closed"][policy].values())
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=policy)
            axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=policy)
        axes[0][col].set_title(f"{name}, 2600/128, 1–32 clients (simulated): p95 ITL")
        axes[1][col].set_title(f"{name} (simulated): p50 ITL")
    for system, runs in measured["online"]["long_prompt"].items():
        if system.startswith("engine"):
            pts = sorted((s["tok_s"], s["itl_p95"] * 1e3, s["itl_p50"] * 1e3) for s in runs.values())
            axes[0][-1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=system[7:])
            axes[1][-1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=system[7:])
    axes[0][-1].set_title("2-core CPU, 3.4M model, 260/13 Poisson (measured, serve.json): p95 ITL")
    axes[1][-1].set_title("CPU (measured): p50 ITL")
    for row in axes:
        for ax in row:
            ax.set_xlabel("output tokens/s")
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "simulate_splitfuse_latency.png", dpi=100)
    # 3. effective throughput vs load (2600/60, 4 tok/s)
    fig, axes = plt.subplots(1, len(acc), figsize=(5.5 * len(acc), 4.5), squeeze=False)
    for col, (name, r) in enumerate(acc.items()):
        w = r["workloads"]["2600/60"]
        for policy in POLICIES:
            loads = list(w["closed"][policy])
            axes[0][col].plot(loads, [w["closed"][policy][c]["eff_req_s_4tok/s"] for c in loads], "o-",
                              label=f"{policy} (closed loop)")
        axes[0][col].set_xlabel("clients")
        axes[0][col].set_ylabel("effective req/s (SLA 4 tok/s)")
        axes[0][col].set_title(f"{name}, 2600/60 (simulated)")
        axes[0][col].grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "simulate_splitfuse_effective.png", dpi=110)


def main(argv):
    del argv
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
           "command": "python benchmarks/simulate_splitfuse.py " + " ".join(sys.argv[1:]),
           "requests": _REQUESTS.value, "seed": _SEED.value}
    result = {"env": env, "fastgen": FASTGEN}
    if _CPU.value:
        measured = measure_cpu()
        fit = fit_cpu(measured)
        # serve.json's own cost curve (prompt passes, measured in the run whose online results the
        # replay is compared with), on this machine's peaks: only the slope and overhead matter
        # where every pass is compute-bound
        serve_json = json.loads((pathlib.Path(__file__).parent / "results" / "serve.json").read_text())
        fit_serve = fit_cpu(dict(measured, prompt={int(T): c for T, c in serve_json["pass_costs"].items()}, decode={}))
        result["cpu"] = {"measured": measured, "efficiency": fit["efficiency"], "overhead_s": fit["overhead_s"],
                         "rows": fit["rows"], "serve_json_fit": {k: fit_serve[k] for k in ("efficiency", "overhead_s",
                                                                                              "rows")},
                         "replay": replay_cpu_serve(fit_serve)}
        print(f"CPU check done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    result["accelerators"] = {name: run_accelerator(name, spec, _REQUESTS.value, _SEED.value)
                              for name, spec in ACCELERATORS.items()}
    result["headline"] = headline(result["accelerators"])
    env["wall_s"] = time.perf_counter() - t0
    (out / "simulate_splitfuse.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "simulate_splitfuse.md").write_text(markdown(result))
    plots(result, out)
    for name, h in result["headline"].items():
        print(f"{name}: effective throughput {h['eff_ratio_closed']:.2f}× (closed) / {h['eff_ratio_open']:.2f}× "
              f"(open), p95 ITL {h['p95_ratio']:.2f}× lower")
    print(f"wrote {out}/simulate_splitfuse.* in {env['wall_s']:.0f}s")


if __name__ == "__main__":
    app.run(main)
