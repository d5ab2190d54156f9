r"""ReFT mini-reproduction: SFT-best vs warm-up vs ReFT vs ReFT without partial reward vs ReFT with
β = 0, over several seeds, on generated arithmetic word problems (see README.md).

  nice -n 10 python -m experiments.reft.run --config=experiments/reft/config.py:mini --workdir=/tmp/jaxllm_reft_exp

Per seed: one SFT run gives the warm-up and SFT-best; each ReFT arm starts from the warm-up.
Greedy test accuracy per arm, voting@k and pass@k, a paired bootstrap 95 % CI of ReFT − SFT-best
over (seed, question) pairs, and reward / KL / length curves. Each process writes every
seed's run in workdir/seed{n}/result.json; the table (results.md, results.json, reft_curves.png in the
workdir and, with --publish, in experiments/reft/) covers every seed found there, so seeds can run
in parallel processes (`--seeds=1`) and be tabulated with `--report_only`.
"""
import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxllm import configs
from jaxllm.data.tasks import arith
from jaxllm.methods import reft, reft_sft
from jaxllm.serve.sampling import SamplingParams
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "ReFT experiment config.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Runs go here.")
_PUBLISH = flags.DEFINE_bool("publish", False, "Also write the results next to this script.")
_SEEDS = flags.DEFINE_string("seeds", "", "Comma-separated seeds to run (default: config.seeds); several "
                             "processes may share one workdir with different seeds.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only tabulate the seed*/result.json in the workdir.")
flags.mark_flags_as_required(["config", "workdir"])

ARMS = {"reft": {}, "reft_no_partial": {"partial_reward": 0.0}, "reft_beta0": {"kl_coef": 0.0}}


def per_question(engine, params, problems, task, max_tokens):
    """Greedy correctness of every problem (0/1 array), through the one extractor."""
    engine.set_params(params)
    prompts = [task.encode_prompt(p["question"]) for p in problems]
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, stop_tokens=(task.tokenizer.eos_id,)))
    preds = [task.extract(task.tokenizer.decode(c.tokens)) for c in outs]
    return np.array([a is not None and task.compare(a, task.parse_gold(p["answer"])) for a, p in zip(preds, problems)],
                    np.float32)


def paired_bootstrap(a, b, samples=2000, seed=0):
    """95 % CI of mean(a − b) resampling paired items."""
    rng = np.random.default_rng(seed)
    diff = np.asarray(a) - np.asarray(b)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def run_seed(c, seed, workdir, task, splits, model_cfg):
    rc = configs.from_mapping(reft.ReFTConfig, {**c.reft.to_dict(), "seed": seed}, "reft.")
    s = c.sft
    sft = reft_sft.sft(model_cfg, None, splits["train"], splits["val"], task, workdir / f"seed{seed}/sft",
                       epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate,
                       warmup_epochs=s.warmup_epochs, length=rc.max_total_len, max_tokens=rc.response_len, seed=seed,
                       mesh=c.mesh)
    engine = reft_sft.make_engine(model_cfg, None, max_len=rc.max_total_len)
    models = {"sft_best": sft.best_params, "warmup": sft.warmup_params}
    curves = {"sft": sft.history}
    for arm, overrides in ARMS.items():
        result = reft.run(dataclasses.replace(rc, **overrides), model_cfg, sft.warmup_params, splits["train"], task,
                          workdir / f"seed{seed}/{arm}", mesh=c.mesh)
        models[arm] = reft.policy_params(rc, model_cfg, jax.device_get(result.state.params))
        curves[arm] = result.history
    out = {"sft_best_epoch": sft.best_epoch, "curves": curves, "models": {}}
    for name, params in models.items():
        correct = per_question(engine, params, splits["test"], task, rc.response_len)
        scores = reft_sft.evaluate(engine, params, splits["test"], task, max_tokens=rc.response_len, k=c.eval_k,
                                   seed=seed)
        out["models"][name] = {"test_correct": correct.tolist(), **scores}
    return out


def report(c, runs, workdir: pathlib.Path, wall_s: float) -> str:
    names = list(next(iter(runs.values()))["models"])
    k = c.eval_k
    lines = [f"seeds {sorted(runs)}; wall time {wall_s / 60:.1f} min (sum over seeds)", "",
             f"| model | greedy test acc (mean ± std) | voting@{k} | pass@{k} |", "|---|---|---|---|"]
    for name in names:
        g = [r["models"][name]["greedy"] for r in runs.values()]
        v = [r["models"][name].get(f"voting@{k}", np.nan) for r in runs.values()]
        p = [r["models"][name].get(f"pass@{k}", np.nan) for r in runs.values()]
        lines.append(f"| {name} | {np.mean(g):.3f} ± {np.std(g):.3f} | {np.mean(v):.3f} | {np.mean(p):.3f} |")
    for arm in ARMS:
        a = np.concatenate([r["models"][arm]["test_correct"] for r in runs.values()])
        b = np.concatenate([r["models"]["sft_best"]["test_correct"] for r in runs.values()])
        mean, lo, hi = paired_bootstrap(a, b)
        lines.append(f"\n{arm} − sft_best (greedy, paired bootstrap over seed×question): {mean:+.3f} "
                     f"[95 % CI {lo:+.3f}, {hi:+.3f}]")
    return "\n".join(lines) + "\n"


def plot(runs, path: pathlib.Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ("reward_mean", "kl_ref", "response_length", "accuracy")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for i, arm in enumerate(ARMS):
            for j, r in enumerate(runs.values()):
                h = r["curves"][arm]
                ax.plot([x["step"] for x in h], [x[key] for x in h], color=f"C{i}", alpha=0.7,
                        label=arm if j == 0 else None)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv):
    common.start(argv)
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(_WORKDIR.value) / "jax_cache"))
    c = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    t = c.task
    task = reft.ReasoningTask(arith.CharTokenizer(), arith.prompt, arith.EXTRACTORS[t.style], arith.parse_gold)
    splits = arith.splits(t.train, t.val, t.test, t.split_seed, t.style)
    model_cfg = configs.model_from_dict({**c.model.to_dict(), "vocab_size": task.tokenizer.vocab_size})
    seeds = [int(x) for x in _SEEDS.value.split(",")] if _SEEDS.value else list(c.seeds)
    for seed in ([] if _REPORT_ONLY.value else seeds):
        start = time.time()
        result = run_seed(c, seed, workdir, task, splits, model_cfg)
        result["wall_s"] = time.time() - start
        (workdir / f"seed{seed}" / "result.json").write_text(json.dumps(result))
    runs = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(workdir.glob("seed*/result.json"))}
    if not runs:
        raise FileNotFoundError(f"no seed*/result.json in {workdir}")
    table = report(c, runs, workdir, sum(r["wall_s"] for r in runs.values()))
    print(table, flush=True)
    for target in [workdir] + ([pathlib.Path(__file__).parent] if _PUBLISH.value else []):
        (target / "results.md").write_text(table)
        (target / "results.json").write_text(json.dumps(
            {str(s): {**r, "models": {n: {k: v for k, v in m.items() if k != "test_correct"}
                                      for n, m in r["models"].items()}} for s, r in runs.items()}, indent=1))
        plot(runs, target / "reft_curves.png")

if __name__ == "__main__":
    app.run(main)
