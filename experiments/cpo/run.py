r"""CPO mini-reproduction: seven arms from one SFT start on the toy translation task with gilded references.

  python -m experiments.cpo.run --config=experiments/cpo/config.py --workdir=/tmp/jaxllm_cpo

Per seed: (1) an SFT start is trained on gilded references; (2) for every pair-building source three
candidates — the gilded reference, a stronger system (true mapping with `strong_error_rate` sentence
errors) and a weaker one (the SFT start's own greedy translation, or with `weak_system="synthetic"` the
true mapping with `weak_error_rate` sentence errors) — are scored by the oracle (chrF against the true
mapping), best = chosen, worst = rejected, middle dropped, all-tie sources dropped (ALMA-R pair
building); (3) seven arms train for the same number of steps from the SFT start with
`jaxllm.methods.preference.fit_preference` (a caller of the one loop `jaxllm.train.fit`); (4) greedy translations of held-out test sources are
scored by oracle chrF and by exact match (not used to build pairs), decoded by `jaxllm.serve.Engine`. Each arm's learning rate is picked
from the grid on the val split with the first seed, except the two ablations of CPO (prefer-only,
NLL-only), which keep CPO's (one term removed, everything else fixed, as in the paper's ablation). Writes results.json, results.md and cpo_results.png
next to this file; checkpoints and metrics.jsonl of every run go under --workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxllm.data import pairs as pair_data
from jaxllm.data.tasks import translation as tr
from jaxllm.methods import preference as mp
from jaxllm.model import presets
from jaxllm.objectives.preference import PreferenceConfig
from jaxllm.serve import Engine, SamplingParams
from jaxllm.train.optim import OptimizerConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics of every run go here.")
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent), "results.json / .md / .png go here.")
flags.mark_flags_as_required(["config", "workdir"])

ARMS = ("sft_ref", "sft_pref", "nll_only", "prefer_only", "dpo", "dpo_nll", "cpo")
LR_FROM = {"sft_ref": "sft_ref", "sft_pref": "sft_pref", "dpo": "dpo", "dpo_nll": "dpo_nll", "cpo": "cpo",
           "prefer_only": "cpo", "nll_only": "cpo"}  # whose tuned learning rate each arm uses
TUNED = ("sft_ref", "sft_pref", "dpo", "dpo_nll", "cpo")
LABELS = {"start": "SFT start", "sft_ref": "SFT on references", "sft_pref": "SFT on preferred", "nll_only": "NLL only",
          "prefer_only": "prefer only", "dpo": "DPO", "dpo_nll": "DPO + NLL", "cpo": "CPO"}
COMPARE = ("sft_ref", "sft_pref", "nll_only", "prefer_only", "dpo", "dpo_nll")  # CPO minus each


def arm_objective(arm: str, beta: float) -> PreferenceConfig | None:
    """The pair loss of an arm; None = SFT (token-mean NLL of the "chosen" side: references for sft_ref,
    preferred responses for sft_pref and nll_only)."""
    return {"dpo": PreferenceConfig(kind="dpo", beta=beta), "dpo_nll": PreferenceConfig(kind="dpo", beta=beta, nll_weight=1.0),
            "cpo": PreferenceConfig(kind="cpo", beta=beta), "prefer_only": PreferenceConfig(kind="cpo", beta=beta, nll_weight=0.0),
            }.get(arm)


@dataclasses.dataclass
class Setup:
    """Everything the arms of one seed share."""

    start_params: object
    pairs: dict  # pair arrays of the kept triplets
    references: dict  # SFT arrays: prompt + gilded reference of every pair-building source
    pair_stats: dict


class Experiment:
    def __init__(self, cfg, workdir: pathlib.Path):
        self.cfg, self.workdir = cfg, workdir
        self.task = tr.TranslationTask(**cfg.task)
        self.tok = self.task.tokenizer()
        self.model = presets.get(cfg.model.preset, **{k: v for k, v in cfg.model.items() if k != "preset"})
        if cfg.weak_system not in ("policy", "synthetic"):
            raise ValueError(f"weak_system must be 'policy' or 'synthetic', got {cfg.weak_system!r}")
        if self.tok.vocab_size > self.model.vocab_size:
            raise ValueError(f"task vocabulary {self.tok.vocab_size} exceeds model vocab_size {self.model.vocab_size}")
        self.splits = self.task.sources(dict(cfg.splits), cfg.split_seed)
        self.truth = {name: [" ".join(self.task.translate(s)) for s in srcs] for name, srcs in self.splits.items()}
        self.devices = jax.devices()[:1]

    def _arrays(self, triplets):
        return pair_data.pair_arrays(self.tok, triplets, max_len=self.cfg.seq_len, max_prompt_len=self.cfg.seq_len // 2,
                                     length=self.cfg.seq_len)

    def _sft_arrays(self, sources, targets):
        return pair_data.response_rows(self.tok, [(tr.prompt(s), tr.response(t)) for s, t in zip(sources, targets)],
                                       max_len=self.cfg.seq_len, max_prompt_len=self.cfg.seq_len // 2,
                                       length=self.cfg.seq_len)

    def translate(self, params, split: str) -> list[str]:
        """Greedy translations of a split, decoded by the engine (up to max_new_tokens, cut at EOS)."""
        prompts = [self.tok.encode(tr.prompt(s), bos=True) for s in self.splits[split]]
        engine = Engine(self.model, jax.device_get(params), token_budget=1024, max_seqs=1024, block_size=16,
                        num_blocks=2 * 1024 + 16)  # rows of <= max_len 32 tokens: two blocks each
        sampling = SamplingParams(max_tokens=self.cfg.max_new_tokens, stop_tokens=(self.tok.eos_id,))
        outs = [c.tokens for c in engine.generate(prompts, sampling)]
        return [self.tok.decode([t for t in o if t != self.tok.eos_id]) for o in outs]

    def score(self, params, split: str) -> dict[str, np.ndarray]:
        """Per-example oracle chrF, exact match and output length (words) of greedy translations."""
        hyps = self.translate(params, split)
        return {"chrf": np.asarray([tr.chrf(h, g) for h, g in zip(hyps, self.truth[split])]),
                "exact": np.asarray([tr.exact_match(h, g) for h, g in zip(hyps, self.truth[split])]),
                "length": np.asarray([len(h.split()) for h in hyps], float)}

    def fit(self, name: str, seed: int, objective, data, *, steps, lr, warmup, params=None, min_lr_ratio=0.1):
        cfg = mp.PreferenceTrainConfig(
            model=self.model, objective=objective, steps=steps, batch_size=self.cfg.batch_size, seed=seed,
            log_every=10, checkpoint_every=steps, keep_checkpoints=1,
            optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=warmup, min_lr_ratio=min_lr_ratio,
                                      weight_decay=0.01, b2=0.99))
        result = mp.fit_preference(cfg, data, self.workdir / f"seed{seed}" / name, params=params,
                                   devices=self.devices, verbose=False)
        if result.preempted:  # SIGTERM: the run saved a checkpoint; stop the whole experiment
            sys.exit(128 + signal.SIGTERM)
        return result

    def setup(self, seed: int) -> Setup:
        rng = np.random.default_rng([seed, 7])
        gild = lambda srcs: [self.task.gild(self.task.translate(s), rng) for s in srcs]  # noqa: E731
        start_cfg = self.cfg.sft_start
        start = self.fit("sft_start", seed, None, self._sft_arrays(self.splits["sft"], gild(self.splits["sft"])),
                         steps=start_cfg.steps, lr=start_cfg.learning_rate, warmup=start_cfg.warmup_steps)
        sources = self.splits["pairs"]
        references = gild(sources)
        strong = [self.task.gild(self.task.translate(s), rng, self.cfg.strong_error_rate) for s in sources]
        if self.cfg.weak_system == "policy":
            weak = [h.split() for h in self.translate(start.state.params, "pairs")]
        else:
            weak = [self.task.gild(self.task.translate(s), rng, self.cfg.weak_error_rate) for s in sources]
        triplets, info = tr.build_triplets(self.task, sources, list(zip(references, strong, weak)))
        names = ("reference", "strong", "weak")
        exact = lambda outs: float(np.mean([" ".join(o) == t for o, t in zip(outs, self.truth["pairs"])]))  # noqa: E731
        stats = {"sources": len(sources), "pairs": len(triplets),
                 "chosen_exact": float(np.mean([p["chosen_exact"] for p in info])),
                 "reference_exact": exact(references), "strong_exact": exact(strong), "weak_exact": exact(weak),
                 "chosen_from": {n: sum(p["chosen"] == k for p in info) for k, n in enumerate(names)},
                 "rejected_from": {n: sum(p["rejected"] == k for p in info) for k, n in enumerate(names)}}
        return Setup(start.state.params, self._arrays(triplets), self._sft_arrays(sources, references), stats)

    def run_arm(self, arm: str, lr: float, seed: int, setup: Setup, tag: str = "", beta: float | None = None):
        data = setup.references if arm == "sft_ref" else setup.pairs
        if arm in ("sft_pref", "nll_only"):
            data = pair_data.chosen_rows(data)
        objective = arm_objective(arm, self.cfg.beta if beta is None else beta)
        return self.fit(f"{arm}{tag}", seed, objective, data, steps=self.cfg.arm_steps,
                        lr=lr, warmup=self.cfg.arm_warmup_steps, params=setup.start_params)


def paired_bootstrap(a_SN: np.ndarray, b_SN: np.ndarray, samples: int, seed: int = 0):
    """Mean of a − b over seeds and examples, and its 95 % CI from resampling test examples (the same
    resample for every seed, so seed and example pairing are kept)."""
    diff_SN = a_SN - b_SN
    rng = np.random.default_rng(seed)
    idx_RN = rng.integers(0, diff_SN.shape[1], size=(samples, diff_SN.shape[1]))
    means_R = diff_SN[:, idx_RN].mean(axis=(0, 2))
    low, high = np.percentile(means_R, [2.5, 97.5])
    return float(diff_SN.mean()), float(low), float(high)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["start", *ARMS]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, title in ((axes[0], "chrf", "held-out oracle chrF"), (axes[1], "exact", "held-out exact match (%)")):
        for x, row in enumerate(rows):
            per_seed = np.asarray(results["test"][row][metric]) * (100 if metric == "exact" else 1)
            ax.bar(x, per_seed.mean(), color="tab:red" if row == "cpo" else "tab:gray", alpha=0.8)
            ax.scatter(np.full(len(per_seed), x), per_seed, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(rows)), [LABELS[r] for r in rows], rotation=35, ha="right")
        ax.set_title(title + " (bars: mean, dots: seeds)")
        low = min(np.min(results["test"][r][metric]) for r in rows) * (100 if metric == "exact" else 1)
        ax.set_ylim(max(0.0, low - 5), None)
    ax = axes[2]
    for arm in ("cpo", "dpo", "dpo_nll", "prefer_only"):
        history = results["curves"][arm]
        ax.plot([h["step"] for h in history], [h["margin"] / results["beta"] for h in history], label=LABELS[arm])
    ax.set_xlabel("step")
    ax.set_title("train margin / β in nats (DPO: relative to the reference), seed 0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    lines = ["| arm | lr | test chrF | test exact match % | mean length (words) | train pref. accuracy (last window) |",
             "|---|---|---|---|---|---|"]
    for row in ["start", *ARMS]:
        t = results["test"][row]
        lr = "—" if row == "start" else f"{results['lr'][LR_FROM[row]]:g}"
        acc = results["final_accuracy"].get(row)
        lines.append(f"| {LABELS[row]} | {lr} | {np.mean(t['chrf']):.2f} ± {np.std(t['chrf']):.2f} | "
                     f"{100 * np.mean(t['exact']):.1f} ± {100 * np.std(t['exact']):.1f} | {np.mean(t['length']):.2f} | "
                     f"{'—' if acc is None else f'{acc:.2f}'} |")
    lines += ["", "Mean ± std over seeds (each seed's value is the mean over the test sources).", "",
              "| CPO minus | Δ chrF [95 % CI] | Δ exact match % [95 % CI] | seeds where CPO is ahead (chrF) |",
              "|---|---|---|---|"]
    for arm in COMPARE:
        d = results["paired"][arm]
        c, e = d["chrf"], d["exact"]
        lines.append(f"| {LABELS[arm]} | {c[0]:+.2f} [{c[1]:+.2f}, {c[2]:+.2f}] | "
                     f"{100 * e[0]:+.1f} [{100 * e[1]:+.1f}, {100 * e[2]:+.1f}] | {d['seeds_ahead']}/{len(results['seeds'])} |")
    lines += ["", f"Learning-rate grid, val chrF (seed {results['seeds'][0]}):", "",
              "| arm | " + " | ".join(f"{lr:g}" for lr in results["lr_grid"]) + " |",
              "|---|" + "---|" * len(results["lr_grid"])]
    for arm in TUNED:
        lines.append(f"| {LABELS[arm]} | " + " | ".join(
            f"{results['grid_val_chrf'][f'{arm} {lr:g}']:.2f}" for lr in results["lr_grid"]) + " |")
    if results["beta_sweep"]:
        lines += ["", f"CPO with other β (lr {results['lr']['cpo']:g}, seed {results['seeds'][0]}):", "",
                  "| β | val chrF | test chrF | test exact match % | mean length |", "|---|---|---|---|---|"]
        for beta, r in results["beta_sweep"].items():
            lines.append(f"| {beta} | {r['val_chrf']:.2f} | {r['test_chrf']:.2f} | {100 * r['test_exact']:.1f} | "
                         f"{r['length']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[2] / ".jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cfg = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value)
    if workdir.exists() and any(workdir.iterdir()):
        raise ValueError(f"workdir {workdir} is not empty: every arm must train from its start, use a fresh one")
    t0 = time.perf_counter()
    exp = Experiment(cfg, workdir)
    seeds = list(cfg.seeds)

    setups = {seeds[0]: exp.setup(seeds[0])}
    print(f"seed {seeds[0]} pairs: {setups[seeds[0]].pair_stats}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    grid, grid_runs = {}, {}
    for arm in TUNED:
        for lr in cfg.lr_grid:
            run = exp.run_arm(arm, lr, seeds[0], setups[seeds[0]], tag=f"_lr{lr:g}")
            grid[(arm, lr)] = float(np.mean(exp.score(run.state.params, "val")["chrf"]))
            grid_runs[(arm, lr)] = run
            print(f"grid {arm} lr {lr:g}: val chrF {grid[(arm, lr)]:.2f}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    best_lr = {arm: max(cfg.lr_grid, key=lambda lr: grid[(arm, lr)]) for arm in TUNED}

    scores = {row: [] for row in ["start", *ARMS]}
    curves, accuracy, pair_stats = {}, {row: [] for row in ARMS}, {}
    for seed in seeds:
        setup = setups.get(seed) or exp.setup(seed)
        pair_stats[seed] = setup.pair_stats
        scores["start"].append(exp.score(setup.start_params, "test"))
        for arm in ARMS:
            lr = best_lr[LR_FROM[arm]]
            run = grid_runs.get((arm, lr)) if seed == seeds[0] else None
            run = run or exp.run_arm(arm, lr, seed, setup)
            scores[arm].append(exp.score(run.state.params, "test"))
            if "accuracy" in run.history[-1]:
                accuracy[arm].append(run.history[-1]["accuracy"])
            if seed == seeds[0]:
                curves[arm] = run.history
            print(f"seed {seed} {arm:12s} test chrF {scores[arm][-1]['chrf'].mean():.2f} exact "
                  f"{scores[arm][-1]['exact'].mean():.3f}  [{time.perf_counter() - t0:.0f}s]", flush=True)

    results = {
        "seeds": seeds, "beta": cfg.beta, "lr": best_lr, "lr_grid": list(cfg.lr_grid), "pair_stats": pair_stats,
        "grid_val_chrf": {f"{f} {lr:g}": v for (f, lr), v in grid.items()},
        "test": {row: {m: [float(s[m].mean()) for s in per_seed] for m in ("chrf", "exact", "length")}
                 for row, per_seed in scores.items()},
        "final_accuracy": {arm: float(np.mean(v)) for arm, v in accuracy.items() if v},
        "paired": {}, "curves": curves,
    }
    for arm in COMPARE:
        results["paired"][arm] = {m: paired_bootstrap(np.stack([s[m] for s in scores["cpo"]]),
                                                      np.stack([s[m] for s in scores[arm]]), cfg.bootstrap_samples)
                                  for m in ("chrf", "exact")}
        results["paired"][arm]["seeds_ahead"] = int(sum(
            c["chrf"].mean() > o["chrf"].mean() for c, o in zip(scores["cpo"], scores[arm])))
    results["beta_sweep"] = {}
    for beta in cfg.cpo_beta_sweep:  # what else was tried for CPO: other β at CPO's lr, first seed
        run = exp.run_arm("cpo", best_lr["cpo"], seeds[0], setups[seeds[0]], tag=f"_beta{beta:g}", beta=beta)
        val, test = exp.score(run.state.params, "val"), exp.score(run.state.params, "test")
        results["beta_sweep"][f"{beta:g}"] = {"val_chrf": float(val["chrf"].mean()), "test_chrf": float(test["chrf"].mean()),
                                              "test_exact": float(test["exact"].mean()),
                                              "length": float(test["length"].mean())}
        print(f"CPO beta {beta:g}: {results['beta_sweep'][f'{beta:g}']}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    results["wall_time_s"] = time.perf_counter() - t0
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    plot(results, out / "cpo_results.png")
    print(table(results))
    print(f"pair stats: {pair_stats}\nlr grid (val chrF): {results['grid_val_chrf']}\n"
          f"wall time {results['wall_time_s']:.0f}s", flush=True)


if __name__ == "__main__":
    app.run(main)
