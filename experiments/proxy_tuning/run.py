r"""Proxy-tuning mini-reproduction (arXiv 2401.08565): does a small tuned expert steer a larger
untuned base to the tuned format while the base keeps its larger store of facts?

  nice -n 10 python -m experiments.proxy_tuning.run --config=experiments/proxy_tuning/config.py \
      --workdir=/tmp/jaxllm_proxy_tuning

Stages (each skipped when its output exists, so a killed run resumes where it stopped):
  data      the facts world (`jaxllm.data.tasks.facts`), `corpus.jsonl` (pretraining documents),
            `tune.jsonl` (question → formatted answer / refusal, as SFT "pairs"), a SentencePiece
            tokenizer trained on both (shared by every model), `splits.json`.
  per seed  `launch.train` pretrains `base_large` and `base_small` (config `pretrain_config.py`);
            `launch.train_preference` with `objective.kind=sft` tunes base_small → `expert` and
            base_large → `tuned` (the "chat" oracle), the same steps (`tune_config.py`). Each stage is
            a subprocess of the project's own entry point, so any of them can be rerun by hand.
  eval      greedy decoding through `jaxllm.serve.Engine` of held-out questions (facts seen in
            pretraining, never in tuning) by base-large, expert-small, proxy-large for every α
            (`jaxllm.methods.proxy_tuning.proxy_engine`: base_large + α·(expert − base_small)) and
            tuned-large; cloze prompts ("the value of K is") measure the bases' fact recall; the same
            prompts decoded by plain base-large and proxy α = 1 give tokens/s.
Writes results.json, results.md and proxy_tuning_alpha.png next to this file (or --out).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxllm.data.pairs import read_triplets
from jaxllm.data.tasks import facts
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods.proxy_tuning import proxy_engine
from jaxllm.model import load_model
from jaxllm.serve import Engine, ProxyTriple, SamplingParams

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Data, checkpoints, metrics and cached evaluations go here.")
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent), "results.json / .md / .png go here.")
flags.mark_flags_as_required(["config", "workdir"])

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
METRICS = ("exact", "format", "fact")
DONE = "STAGE_DONE"


# ---- data ------------------------------------------------------------------------------------

def prepare_data(cfg, task: facts.FactsTask, workdir: pathlib.Path) -> dict:
    """The shared data stage: corpus, tuning pairs, tokenizer and key splits (written once)."""
    paths = {name: workdir / name for name in ("corpus.jsonl", "tune.jsonl", "tokenizer.model", "splits.json")}
    if all(p.exists() for p in paths.values()):
        return {**{k: str(v) for k, v in paths.items()}, "splits": json.loads(paths["splits.json"].read_text())}
    workdir.mkdir(parents=True, exist_ok=True)
    s = cfg.splits
    splits = task.splits({"tune": s.tune, "test": s.test}, {"tune": s.tune_unknown, "test": s.test_unknown}, s.seed)
    docs = task.pretraining_documents(np.random.default_rng(task.world_seed))
    paths["corpus.jsonl"].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tune = facts.tuning_examples(task, splits["tune"])
    paths["tune.jsonl"].write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": r}) + "\n"
                                           for p, r in tune))
    # One tokenizer for every model, trained on all text any model sees (pretraining + tuning format,
    # including every key's question, so no key is split differently at test time).
    text = workdir / "tokenizer_text.txt"
    text.write_text("\n".join(docs + [p + r for p, r in facts.tuning_examples(task, [*task.keys, *task.unknown_keys])]))
    Tokenizer.train([text], cfg.tokenizer_vocab, out_prefix=workdir / "tokenizer")
    paths["splits.json"].write_text(json.dumps(splits))
    return {**{k: str(v) for k, v in paths.items()}, "splits": splits}


# ---- training stages (subprocesses of the project's entry points) ----------------------------

def run_stage(name: str, workdir: pathlib.Path, argv: list[str], log: list) -> None:
    """Run `python -m <argv>` at low priority unless `workdir/STAGE_DONE` exists; then mark it."""
    if (workdir / DONE).exists():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"[{name}] python -m {' '.join(argv)}", flush=True)
    with open(workdir / "stage.log", "a") as out:
        subprocess.run(["nice", "-n", "10", sys.executable, "-m", *argv], cwd=ROOT, check=True, stdout=out,
                       stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    (workdir / DONE).write_text(f"{time.time() - start:.1f}\n")
    log.append((name, time.time() - start))


def flag_overrides(prefix: str, fields) -> list[str]:
    """`--config.<prefix><name>=<value>` for every field (tuples comma-joined)."""
    return [f"--config.{prefix}{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
            for k, v in fields.items()]


def train_seed(cfg, data: dict, workdir: pathlib.Path, seed: int, log: list) -> None:
    """The four training stages of one seed; the run's config values are passed as flag overrides,
    so the subprocess trains exactly what this config says."""
    common = [f"--config.seed={seed}", f"--config.data.tokenizer={data['tokenizer.model']}"]
    p, t = cfg.pretrain, cfg.tune
    for size in ("large", "small"):
        run_stage(f"seed {seed} pretrain {size}", workdir / f"base_{size}",
                  ["launch.train", f"--config={HERE / 'pretrain_config.py'}:{size}",
                   f"--workdir={workdir / f'base_{size}'}", f"--config.data.files={data['corpus.jsonl']}", *common,
                   *flag_overrides("model.", {"vocab_size": cfg.tokenizer_vocab, "max_len": cfg.max_len, **cfg[size]}),
                   *flag_overrides("", {"steps": p.steps, "checkpoint_every": p.steps, "batch_size": p.batch_size,
                                        "seq_len": p.seq_len}),
                   *flag_overrides("optimizer.", {"learning_rate": p.learning_rate, "warmup_steps": p.warmup_steps})],
                  log)
    for name, start in (("expert", "base_small"), ("tuned", "base_large")):
        run_stage(f"seed {seed} tune {name}", workdir / name,
                  ["launch.train_preference", f"--config={HERE / 'tune_config.py'}", f"--workdir={workdir / name}",
                   f"--config.data.files={data['tune.jsonl']}", f"--config.init_checkpoint={workdir / start}", *common,
                   *flag_overrides("", {"steps": t.steps, "checkpoint_every": t.steps, "batch_size": t.batch_size}),
                   *flag_overrides("optimizer.", {"learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps}),
                   *flag_overrides("data.", {"max_len": t.max_len, "max_prompt_len": t.max_prompt_len})], log)


# ---- evaluation ------------------------------------------------------------------------------

class Evaluator:
    """Engines built once (plain large, plain small, one proxy engine per α) whose weights are
    swapped per seed with `set_params`, so each compiles its buckets once for the whole run."""

    def __init__(self, cfg, task: facts.FactsTask, tokenizer: Tokenizer, splits: dict):
        self.cfg, self.task, self.tok = cfg, task, tokenizer
        self.test = splits["test"]
        self.known = [k for k in self.test if k in task.facts]
        self.unknown = [k for k in self.test if k not in task.facts]
        self.engines: dict = {}

    def _engine(self, name, configs, params, alpha=None):
        if name not in self.engines:
            kw = dict(self.cfg.engine, max_model_len=self.cfg.max_len, tokenizer=None)
            self.engines[name] = (Engine(configs, params, **kw) if alpha is None
                                  else proxy_engine(configs, params, alpha, **kw))
        else:
            self.engines[name].set_params(params)
        return self.engines[name]

    def _decode(self, engine, prompts, max_tokens, stop=True):
        """Greedy texts of `prompts` (texts, or ProxyTriples of per-member texts) and tokens/s."""
        sampling = SamplingParams(max_tokens=max_tokens, stop_tokens=(self.tok.eos_id,) if stop else ())
        encode = lambda p: self.tok.encode(p, bos=True)  # noqa: E731
        ids = [ProxyTriple(*map(encode, p)) if isinstance(p, ProxyTriple) else encode(p) for p in prompts]
        start = time.perf_counter()
        out = engine.generate(ids, sampling)
        seconds = time.perf_counter() - start
        texts = [self.tok.decode([t for t in c.tokens if t != self.tok.eos_id]) for c in out]
        return texts, sum(len(c.tokens) for c in out) / seconds

    def _score(self, texts) -> dict:
        known = facts.score(self.task, self.known, texts[:len(self.known)])
        refusal = facts.score(self.task, self.unknown, texts[len(self.known):])["exact"] if self.unknown else None
        return {**known, "refusal": refusal}

    def member_prompts(self, workdir: pathlib.Path) -> dict:
        """The proxy with per-member prompts (the paper's setting, where only the expert sees the
        tuned format): base-large and the anti-expert see the pretraining-style cloze "the value of
        K is", the expert sees the question; scores per α (cached in eval_member_prompts.json)."""
        cached = workdir / "eval_member_prompts.json"
        if cached.exists():
            return json.loads(cached.read_text())
        models = {name: load_model(workdir / name) for name in ("base_large", "base_small", "expert")}
        configs = ProxyTriple(models["base_large"][0], models["expert"][0], models["base_small"][0])
        params = ProxyTriple(models["base_large"][1], models["expert"][1], models["base_small"][1])
        prompts = [ProxyTriple(facts.cloze(k), facts.question(k), facts.cloze(k)) for k in self.test]
        out, samples = {}, {}
        for alpha in self.cfg.alphas:
            texts, _ = self._decode(self._engine(f"proxy-{alpha}", configs, params, alpha), prompts, self.cfg.max_tokens)
            out[f"{alpha:g}"] = self._score(texts)
            samples[f"{alpha:g}"] = list(zip(self.test[:3], texts[:3]))
        cached.write_text(json.dumps({"systems": out, "samples": samples}, indent=1))
        return {"systems": out, "samples": samples}

    def seed(self, workdir: pathlib.Path) -> dict:
        """Every system's scores on the held-out questions of one seed (cached in eval.json)."""
        cached = workdir / "eval.json"
        if cached.exists():
            return json.loads(cached.read_text())
        models = {name: load_model(workdir / name) for name in ("base_large", "base_small", "expert", "tuned")}
        questions = [facts.question(k) for k in self.test]
        clozes = [facts.cloze(k) for k in self.known]
        n = self.cfg.max_tokens
        out, samples = {"systems": {}, "cloze_recall": {}}, {}
        for label, (name, size) in {"base-large": ("base_large", "large"), "expert-small": ("expert", "small"),
                                    "tuned-large": ("tuned", "large")}.items():
            engine = self._engine(f"plain-{size}", *models[name])
            texts, _ = self._decode(engine, questions, n)
            out["systems"][label], samples[label] = self._score(texts), texts[:3]
            if name.startswith("base"):
                recall, _ = self._decode(engine, clozes, n)
                out["cloze_recall"][label] = facts.score(self.task, self.known, recall)["fact"]
        base_small_engine = self._engine("plain-small", *models["base_small"])
        recall, _ = self._decode(base_small_engine, clozes, n)
        out["cloze_recall"]["base-small"] = facts.score(self.task, self.known, recall)["fact"]
        configs = ProxyTriple(models["base_large"][0], models["expert"][0], models["base_small"][0])
        params = ProxyTriple(models["base_large"][1], models["expert"][1], models["base_small"][1])
        for alpha in self.cfg.alphas:
            engine = self._engine(f"proxy-{alpha}", configs, params, alpha)
            texts, _ = self._decode(engine, questions, n)
            out["systems"][f"proxy-large α={alpha:g}"], samples[f"proxy α={alpha:g}"] = self._score(texts), texts[:3]
        # Throughput: the same prompts, fixed length (no stop), warm engines, plain vs proxy α = 1.
        plain = self._engine("plain-large", *models["base_large"])
        proxy = self._engine("proxy-1.0", configs, params, 1.0)
        speeds = {}
        for label, engine in (("plain", plain), ("proxy", proxy), ("plain2", plain), ("proxy2", proxy)):
            speeds[label] = self._decode(engine, questions, self.cfg.speed_tokens, stop=False)[1]
        out["tokens_per_s"] = {"plain": max(speeds["plain"], speeds["plain2"]),
                               "proxy": max(speeds["proxy"], speeds["proxy2"])}
        out["samples"] = {k: list(zip(self.test[:3], v)) for k, v in samples.items()}
        cached.write_text(json.dumps(out, indent=1))
        return out


# ---- aggregation and reporting ---------------------------------------------------------------

def mean_std(values):
    values = np.asarray([v for v in values if v is not None], np.float64)
    return (float(values.mean()), float(values.std())) if len(values) else (None, None)


def gap_closed(proxy: float, base: float, tuned: float) -> float | None:
    """(proxy − base) / (tuned − base); None when tuning does not improve on the base (no gap)."""
    return None if tuned - base <= 0 else (proxy - base) / (tuned - base)


def aggregate(cfg, per_seed: dict) -> dict:
    systems = list(next(iter(per_seed.values()))["systems"])
    table = {s: {m: mean_std([r["systems"][s][m] for r in per_seed.values()]) for m in (*METRICS, "refusal")}
             for s in systems}
    recall = {s: mean_std([r["cloze_recall"][s] for r in per_seed.values()])
              for s in ("base-large", "base-small")}
    speed = {k: mean_std([r["tokens_per_s"][k] for r in per_seed.values()]) for k in ("plain", "proxy")}
    member = {f"{a:g}": {m: mean_std([r["member_prompts"]["systems"][f"{a:g}"][m] for r in per_seed.values()])
                         for m in (*METRICS, "refusal")} for a in cfg.alphas}
    gaps = {}
    for alpha in cfg.alphas:
        proxy = f"proxy-large α={alpha:g}"
        per_metric = {m: gap_closed(table[proxy][m][0], table["base-large"][m][0], table["tuned-large"][m][0])
                      for m in METRICS}
        capped = [min(g, 1.0) for g in per_metric.values() if g is not None]
        gaps[f"{alpha:g}"] = {**per_metric, "mean_capped": float(np.mean(capped)) if capped else None}
    return {"table": table, "member_prompts": member, "cloze_recall": recall, "tokens_per_s": speed,
            "gap_closed": gaps}


def pct(ms) -> str:
    mean, std = ms
    return "—" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def write_markdown(cfg, agg: dict, path: pathlib.Path, seeds, wall: float, stage_seconds: float) -> None:
    lines = [f"Seeds {list(seeds)}; mean ± std over seeds, % of {cfg.splits.test} held-out known keys "
             f"(refusal: {cfg.splits.test_unknown} held-out unknown keys). Wall time of the call that wrote this: "
             f"{wall / 60:.1f} min (a resumed call skips finished stages); the training stages took "
             f"{stage_seconds / 60:.1f} min in all.", "",
             "| system | exact match | format | fact | refusal (unknown keys) |", "|---|---|---|---|---|"]
    order = ["base-large", "expert-small", "proxy-large α=1", "tuned-large"]
    for s in order + [s for s in agg["table"] if s not in order]:
        row = agg["table"][s]
        lines.append(f"| {s} | " + " | ".join(pct(row[m]) for m in (*METRICS, "refusal")) + " |")
    lines += ["", "Gap closed = (proxy − base-large) / (tuned-large − base-large) per metric on the seed means; "
              "'mean (capped)' averages the metrics with each capped at 100 % (a metric with no gap is left out).",
              "", "| α | exact | format | fact | mean (capped) |", "|---|---|---|---|---|"]
    for alpha, g in agg["gap_closed"].items():
        cells = ["—" if g[m] is None else f"{100 * g[m]:.0f} %" for m in (*METRICS, "mean_capped")]
        lines.append(f"| {alpha} | " + " | ".join(cells) + " |")
    lines += ["", "Proxy with per-member prompts (base-large and anti-expert see 'the value of K is', the expert "
              "sees the question):", "", "| α | exact | format | fact | refusal |", "|---|---|---|---|---|"]
    for alpha, row in agg["member_prompts"].items():
        lines.append(f"| {alpha} | " + " | ".join(pct(row[m]) for m in (*METRICS, "refusal")) + " |")
    r, sp = agg["cloze_recall"], agg["tokens_per_s"]
    lines += ["", f"Bases' fact recall on cloze prompts ('the value of K is'): base-large {pct(r['base-large'])}, "
              f"base-small {pct(r['base-small'])}.",
              f"Decoding throughput (same prompts, {cfg.speed_tokens} tokens each, warm engines): plain base-large "
              f"{sp['plain'][0]:.0f} ± {sp['plain'][1]:.0f} tok/s, proxy α=1 {sp['proxy'][0]:.0f} ± "
              f"{sp['proxy'][1]:.0f} tok/s ({sp['plain'][0] / sp['proxy'][0]:.2f}× slower)."]
    path.write_text("\n".join(lines) + "\n")


def plot(cfg, agg: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    alphas = list(cfg.alphas)
    for ax, metric in zip(axes, ("format", "fact", "exact")):
        rows = [agg["table"][f"proxy-large α={a:g}"][metric] for a in alphas]
        ax.errorbar(alphas, [100 * m for m, _ in rows], [100 * s for _, s in rows], marker="o", capsize=3,
                    label="proxy-large")
        rows = [agg["member_prompts"][f"{a:g}"][metric] for a in alphas]
        ax.errorbar(alphas, [100 * m for m, _ in rows], [100 * s for _, s in rows], marker="s", capsize=3, ls="--",
                    label="proxy-large, base/anti on cloze")
        for label, style in (("expert-small", ":"), ("tuned-large", "--"), ("base-large", "-.")):
            ax.axhline(100 * agg["table"][label][metric][0], ls=style, color="gray", label=label)
        ax.set(xlabel="α", ylabel=f"{metric} accuracy (%)", title=f"{metric} accuracy vs α", ylim=(-3, 103))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    cfg, workdir, out = _CONFIG.value, pathlib.Path(_WORKDIR.value), pathlib.Path(_OUT.value)
    start = time.time()
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    task = facts.FactsTask(**cfg.task)
    data = prepare_data(cfg, task, workdir)
    if len(read_triplets(data["tune.jsonl"])) != cfg.splits.tune + cfg.splits.tune_unknown:
        raise ValueError(f"{data['tune.jsonl']} was written by another config; use a fresh --workdir")
    log: list = []
    evaluator = Evaluator(cfg, task, Tokenizer.load(data["tokenizer.model"]), data["splits"])
    per_seed = {}
    for seed in cfg.seeds:  # train and evaluate seed by seed, so a partial run has finished seeds
        train_seed(cfg, data, workdir / f"seed{seed}", seed, log)
        per_seed[seed] = evaluator.seed(workdir / f"seed{seed}")
        per_seed[seed]["member_prompts"] = evaluator.member_prompts(workdir / f"seed{seed}")
        summary = {k: v for k, v in per_seed[seed].items() if k not in ("samples", "member_prompts")}
        print(f"seed {seed}: {json.dumps(summary)}", flush=True)
    agg = aggregate(cfg, per_seed)
    wall = time.time() - start
    stage_seconds = sum(float((p / DONE).read_text()) for p in workdir.glob("seed*/*") if (p / DONE).exists())
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"config": cfg.to_dict(), "per_seed": per_seed, "aggregate": agg, "wall_seconds_this_call": wall,
         "training_stage_seconds": stage_seconds, "stages_run_this_call": log}, indent=1, default=str))
    write_markdown(cfg, agg, out / "results.md", cfg.seeds, wall, stage_seconds)
    plot(cfg, agg, out / "proxy_tuning_alpha.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    app.run(main)
