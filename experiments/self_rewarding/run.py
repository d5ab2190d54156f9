r"""Mini-reproduction of Self-Rewarding LMs (arXiv 2401.10020) on the toy instruction task.

  nice -n 10 python -m experiments.self_rewarding.run --config=experiments/self_rewarding/config.py \
      --workdir=/tmp/jaxllm_sr_exp --seeds=0,1,2 --arms=self,oracle,positive_sft,ift_only

Arms (each M1 → M2 → M3 with equal training steps per iteration):
  self          the method: the model judges its own candidates, DPO on best vs worst
  oracle        pairs ranked by the ground-truth rubric instead of the model's judge (upper bound)
  positive_sft  SFT on the candidates the model itself scored 5 (the paper's positive-only augmentation)
  ift_only      the method from an M1 trained on IFT only (no EFT)
Every M_t is measured against the ground truth, never the model's own judge: greedy exact-match
accuracy and mean rubric score on the held-out test prompts, mean response length, and the judge's
pairwise accuracy on held-out (prompt, responses) sets ranked by the rubric (a judge tie or an
unparseable score counts as wrong). Writes results.json, results.md and PNGs into the workdir.
"""
import dataclasses
import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxllm.data.tasks import instructions as ins
from jaxllm.methods.self_rewarding import judging, loop, toy, training
from jaxllm.model import llama
from jaxllm.serve.sampling import SamplingParams
from jaxllm.model import model_dir
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/self_rewarding/config.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/jaxllm_sr_exp", "Models and results go here.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_ARMS = flags.DEFINE_list("arms", ["self", "oracle", "positive_sft", "ift_only"], "Arms to run.")
_MERGE = flags.DEFINE_list("merge", [], "Only merge the results.json of these workdirs (runs of other seeds, "
                           "e.g. in parallel processes) into --workdir's results.md and PNGs.")
ARMS = ("self", "oracle", "positive_sft", "ift_only")
PAPER = {"AlpacaEval 2.0 win rate (%)": {"M1": 9.94, "M2": 15.38, "M3": 20.44},
         "judge pairwise accuracy (%)": {"SFT": 65.1, "M1": 78.7, "M2": 80.4, "M3": 81.7}}


def evaluate(setup: toy.ToySetup, engine, params, seed: int) -> dict:
    """Ground-truth measures of one model (see module docstring)."""
    engine.set_params(params)
    tok, task, test = setup.tokenizer, setup.task, setup.splits["test"]
    out = engine.generate([training.prompt_ids(tok, p) for p in test],
                          SamplingParams(max_tokens=setup.cfg.max_new_tokens, stop_tokens=(tok.eos_id,)))
    responses = [tok.decode(c.tokens) for c in out]
    scores = [ins.rubric_score(task, p, r) for p, r in zip(test, responses)]
    items = [(p, r) for p, rs, _ in setup.judge_sets for r in rs]
    judged = judging.judge(engine, tok, items, setup.cfg.judge, seed=seed).scores.reshape(len(setup.judge_sets), -1)
    right = total = 0
    for (_, _, true), js in zip(setup.judge_sets, judged):
        for i in range(len(true)):
            for j in range(i + 1, len(true)):
                if true[i] != true[j]:
                    total += 1
                    right += bool(np.isfinite(js[i]) and np.isfinite(js[j]) and (js[i] - js[j]) * (true[i] - true[j]) > 0)
    return {"accuracy": float(np.mean([r == task.answer(p) for p, r in zip(test, responses)])),
            "true_score": float(np.mean(scores)), "length": float(np.mean([len(r) for r in responses])),
            "judge_pairwise_accuracy": right / max(total, 1),
            "judge_parse_failure": float(np.mean(~np.isfinite(judged)))}


def positive_sft_run(setup, workdir: pathlib.Path, engine) -> list[dict]:
    """M1 → M3 by SFT on self-generated candidates the model scored 5 (as many steps as DPO)."""
    cfg, tok, stats = setup.cfg, setup.tokenizer, []
    for t in range(1, cfg.iterations + 1):
        path = workdir / f"M{t + 1}"
        if (path / model_dir.CONFIG_FILE).exists():
            continue
        _, params = model_dir.load_model(workdir / f"M{t}")
        engine.set_params(params)
        prompts = setup.prompt_source(t, cfg.prompts_per_iteration)
        cands = loop.generate_candidates(engine, tok, prompts, cfg, seed=cfg.seed * 1000 + t)
        items = [(p, c) for p, cs in zip(prompts, cands) for c in cs]
        scores = judging.judge(engine, tok, items, cfg.judge, seed=cfg.seed * 1000 + t).scores
        keep = [it for it, s in zip(items, scores) if s >= 5.0]
        stats.append({"iteration": t, "examples": len(keep), "of": len(items)})
        if not keep:
            raise ValueError(f"positive-only SFT: no candidate scored 5 at iteration {t}")
        rows = training.sft_arrays(tok, keep, cfg.dpo_stage.seq_len)
        params, _ = training.train_sft(setup.model, params, rows, cfg.dpo_stage, seed=cfg.seed,
                                       workdir=workdir / f"iteration{t}" / "sft")
        model_dir.save_model(path, setup.model, params)
    return stats


def oracle_reward(task):
    def reward(prompts, candidates):
        return np.asarray([[ins.rubric_score(task, p, c) for c in cs] for p, cs in zip(prompts, candidates)], float)
    return reward


def run_arm(config: dict, arm: str, seed: int, root: pathlib.Path) -> list[dict]:
    config = {**config, "seed": seed, "task": {**config["task"], "use_eft": arm != "ift_only"}}
    setup = toy.build(config)
    shared_m1 = root / f"seed{seed}" / ("M1_ift_only" if arm == "ift_only" else "M1")
    workdir = root / f"seed{seed}" / arm
    workdir.mkdir(parents=True, exist_ok=True)
    params0 = llama.init_params(setup.model, jax.random.key(seed))
    start = time.time()
    if not (shared_m1 / model_dir.CONFIG_FILE).exists():  # one M1 per (seed, data), shared by the arms
        loop.run(setup.model, params0, setup.tokenizer, setup.sft_examples, setup.prompt_source,
                 dataclasses.replace(setup.cfg, iterations=0), shared_m1.parent / f"_{shared_m1.name}")
        shutil.copytree(shared_m1.parent / f"_{shared_m1.name}" / "M1", shared_m1)
    if not (workdir / "M1").exists():
        shutil.copytree(shared_m1, workdir / "M1")
    engine = loop.make_engine(setup.model, params0)
    extra = {}
    try:
        if arm == "positive_sft":
            extra["positive_examples"] = positive_sft_run(setup, workdir, engine)
        else:
            reward_fn = oracle_reward(setup.task) if arm == "oracle" else None
            reports = loop.run(setup.model, params0, setup.tokenizer, setup.sft_examples, setup.prompt_source,
                               setup.cfg, workdir, reward_fn=reward_fn, engine=engine)
            extra["iterations"] = [r.to_json() for r in reports]
    except ValueError as e:  # no pairs (NoPairsError, with its stats) or no positive example: a result too
        extra["stopped"] = str(e)
        print(f"{arm} seed {seed} stopped: {e}", flush=True)
    reports_done = sorted(workdir.glob("M*/" + loop.REPORT_FILE))
    extra.setdefault("iterations", [json.loads(p.read_text()) for p in reports_done])
    rows = []
    for t in range(1, setup.cfg.iterations + 2):
        if not (workdir / f"M{t}" / model_dir.CONFIG_FILE).exists():
            break
        _, params = model_dir.load_model(workdir / f"M{t}")
        rows.append({"seed": seed, "arm": arm, "model": f"M{t}", **evaluate(setup, engine, params, seed)})
    rows[-1]["wall_s"] = time.time() - start
    rows[-1].update(extra)
    return rows


def write_results(rows: list[dict], root: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (root / "results.json").write_text(json.dumps(rows, indent=1))
    metrics = ("accuracy", "true_score", "judge_pairwise_accuracy", "judge_parse_failure", "length")
    lines = ["| arm | model | seeds | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for arm in ARMS:
        for m in sorted({r["model"] for r in rows if r["arm"] == arm}):
            sel = [r for r in rows if r["arm"] == arm and r["model"] == m]
            cells = [f"{np.mean([r[k] for r in sel]):.3f} ± {np.std([r[k] for r in sel]):.3f}" for k in metrics]
            lines.append(f"| {arm} | {m} | {len(sel)} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | iteration | seeds | pairs / prompts | tie rate | candidates without valid score | "
              "judge samples unparsed | score histogram 0..5 (sum over seeds) | chosen / rejected length | "
              "DPO loss first → last |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        its = [it for r in rows if r["arm"] == arm for it in r.get("iterations", [])]
        for t in sorted({it["iteration"] for it in its}):
            sel = [it for it in its if it["iteration"] == t]
            mean = lambda f: float(np.nanmean([f(it) for it in sel]))  # noqa: E731
            hist = np.sum([it["pairs"]["score_histogram"] for it in sel], axis=0).tolist()
            lines.append(
                f"| {arm} | {t} | {len(sel)} | {mean(lambda i: i['pairs']['pairs_out']):.1f} / "
                f"{mean(lambda i: i['pairs']['prompts_in']):.0f} | {mean(lambda i: i['pairs']['tie_rate']):.3f} | "
                f"{mean(lambda i: i['pairs']['invalid_rate']):.3f} | {mean(lambda i: i['judge_parse_failure_rate']):.3f} | "
                f"{hist} | {mean(lambda i: i['pairs']['mean_chosen_len']):.2f} / "
                f"{mean(lambda i: i['pairs']['mean_rejected_len']):.2f} | {mean(lambda i: i['dpo_first_loss']):.4f} → "
                f"{mean(lambda i: i['dpo_last_loss']):.4f} |")
    stopped = [f"{r['arm']} seed {r['seed']}: {r['stopped']}" for r in rows if "stopped" in r]
    if stopped:
        lines += ["", "Stopped arms:", *[f"- {s}" for s in stopped]]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    for metric in ("accuracy", "judge_pairwise_accuracy"):
        plt.figure(figsize=(5, 3.5))
        for arm in ARMS:
            models = sorted({r["model"] for r in rows if r["arm"] == arm})
            if not models:
                continue
            means = [np.mean([r[metric] for r in rows if r["arm"] == arm and r["model"] == m]) for m in models]
            plt.plot(models, means, marker="o", label=arm)
        plt.ylabel(metric)
        plt.legend()
        plt.tight_layout()
        plt.savefig(root / f"{metric}.png", dpi=120)
        plt.close()


def main(argv):
    common.start(argv)
    config = _CONFIG.value.to_dict()
    config.pop("init_model", None)
    root = pathlib.Path(_WORKDIR.value)
    root.mkdir(parents=True, exist_ok=True)
    if _MERGE.value:
        rows = [r for d in _MERGE.value for r in json.loads((pathlib.Path(d) / "results.json").read_text())]
        write_results(rows, root)
        return
    rows = []
    unknown = set(_ARMS.value) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; known: {ARMS}")
    for arm in _ARMS.value:  # every seed of an arm before the next arm: the method first
        for seed in map(int, _SEEDS.value):
            rows += run_arm(config, arm, seed, root)
            write_results(rows, root)
            print(json.dumps(rows[-1]), flush=True)
    print(f"paper (Llama-2-70B): {PAPER}; results in {root}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    common.run(main)
