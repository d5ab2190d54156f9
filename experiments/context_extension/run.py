r"""Runs the context-extension mini-reproduction: pretrain (cached), the SFT learning-rate sweep,
every arm × seed, the transform-only variants, the entropy probe, then tables and plots.

  python -m experiments.context_extension.run --config=experiments/context_extension/config.py

Per regime (see config.py), with c the pretraining window:
1. pretrain a tiny Llama at c on passkey rows (one key–value pair in corpus filler, asked at the
   end) plus plain corpus rows; loss = mean answer NLL + mean text NLL. Cached as a
   jaxllm model directory in WORKDIR/pretrained_<regime> (reused when present);
2. SFT learning rate: every arm with seed 0 at each lr of `sft.lr_grid`, scored by retrieval
   accuracy at 4c on a validation set; the lr with the best mean over arms is used for all arms;
3. every arm (`jaxllm.methods.context_extension.extend`, target 4c, 100 samples of length 4c,
   2 epochs at batch 32 = 6 steps) for every seed (seed = SFT data draw + order), and the
   transform-only variant (no SFT);
4. evaluation on held-out rows (validation corpus documents, separate seeds): retrieval accuracy
   at c, 2c, 4c, 8c (all queries of all rows) and perplexity by position bucket on corpus rows of
   length 8c; attention entropy per layer and position for the pretrained model under each
   transform and after SFT.

Results accumulate in WORKDIR/results.json (a re-run skips what is there); the tables go to
OUT/results_<regime>.md and the plots to OUT/*.png.
"""
import dataclasses
import json
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxllm.data.tasks import long_context as lc  # noqa: E402
from jaxllm.methods import context_extension as ce  # noqa: E402
from jaxllm.model import llama, rope  # noqa: E402
from jaxllm.objectives.lm import nll_loss  # noqa: E402
from jaxllm.data.epochs import DrawnBatches  # noqa: E402
from jaxllm.model import load_model, save_model  # noqa: E402
from jaxllm.train import optim  # noqa: E402
from jaxllm.train.finetune import start_params  # noqa: E402
from jaxllm.train.loop import LoopConfig, fit  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/context_extension/config.py",
                                          "Experiment config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", "experiments/context_extension", "Folder for tables and plots.")

LABELS = {"none": "no RoPE change", "pi": "PI", "ntk": "NTK-aware", "yarn": "YaRN", "abf": "ABF",
          "eabf": "EABF (layers 0-1 exempt)", "eabf_all": "EABF (all layers)"}


class Clock:
    """Wall and CPU seconds of named phases."""

    def __init__(self):
        self.totals = {}

    def phase(self, name):
        clock = self

        class _Phase:
            def __enter__(self):
                self.wall, self.cpu = time.time(), time.process_time()

            def __exit__(self, *exc):
                wall, cpu = clock.totals.get(name, (0.0, 0.0))
                clock.totals[name] = (wall + time.time() - self.wall, cpu + time.process_time() - self.cpu)

        return _Phase()


def task_config(c) -> lc.RetrievalConfig:
    return lc.RetrievalConfig(vocab=lc.TaskVocab(c.task.n_keys, c.task.n_values), n_pairs=c.task.n_pairs,
                              answer_len=c.task.answer_len, n_queries=c.task.n_queries)


def model_config(c, regime: str) -> llama.LlamaConfig:
    return llama.LlamaConfig(**c.model.to_dict(), rope=rope.default(c.model.head_dim, c.regime[regime].base),
                             max_len=c.window)


# ----------------------------------------------------------------------------- pretraining

def pretrain_batch(rng, c, task, stream) -> dict:
    n_lm = c.pretrain.lm_rows
    r = lc.retrieval_samples(rng, c.pretrain.batch_size - n_lm, c.window, task, stream)
    lm = lc.lm_rows(rng, n_lm, c.window, stream)
    return {"tokens": np.concatenate([r["tokens"], lm["tokens"]]),
            "answer_mask": np.concatenate([r["answer_mask"], np.zeros_like(lm["loss_mask"])]),
            "text_mask": np.concatenate([r["lm_mask"] - r["answer_mask"], lm["loss_mask"]])}


def pretrain(c, model_cfg, path: pathlib.Path, task, stream):
    """Params pretrained at the window (loaded from `path` when already there)."""
    if (path / "config.json").exists():
        loaded_cfg, params = load_model(path)
        if loaded_cfg.rope.inv_freq != model_cfg.rope.inv_freq or loaded_cfg.d_model != model_cfg.d_model:
            raise ValueError(f"cached model in {path} does not match the config; delete it to pretrain again")
        print(f"loaded pretrained model from {path}", flush=True)
        return params

    def loss_fn(params, batch, rng):
        logits = llama.forward(model_cfg, params, batch["tokens"])
        answer = nll_loss(logits, batch["tokens"], batch["answer_mask"])
        text = nll_loss(logits, batch["tokens"], batch["text_mask"])
        return {"answer": answer, "text": text}, {"answer_nll": answer[0] / answer[1], "text_nll": text[0] / text[1]}

    p = c.pretrain
    opt_cfg = optim.OptimizerConfig(learning_rate=p.learning_rate, warmup_steps=p.warmup_steps,
                                    min_lr_ratio=p.min_lr_ratio, weight_decay=p.weight_decay)
    optimizer, schedule = optim.make_optimizer(opt_cfg, p.steps)
    batches = DrawnBatches(lambda rng: pretrain_batch(rng, c, task, stream), p.seed)
    loop_config = LoopConfig(steps=p.steps, seed=p.seed, log_every=100, checkpoint_every=p.steps, keep_checkpoints=1,
                             learning_rate=schedule)
    result = fit(loss_fn, optimizer, batches, start_params(model_cfg, None, p.seed), path.parent / f"{path.name}_run",
                 loop_config, devices=jax.devices()[:1])
    save_model(path, model_cfg, result.state.params)
    return result.state.params


# ----------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class TestSets:
    retrieval: dict  # length -> samples
    lm_tokens: np.ndarray
    lm_mask: np.ndarray
    edges: np.ndarray


def test_sets(c, task, stream, seed: int, n_retrieval: int, lengths) -> TestSets:
    retrieval = {L: lc.retrieval_samples(np.random.default_rng(seed + L), n_retrieval, L, task, stream)
                 for L in lengths}
    longest = max(lengths)
    lm = lc.lm_rows(np.random.default_rng(seed), c.eval.n_lm_rows, longest, stream)
    return TestSets(retrieval, lm["tokens"], lm["loss_mask"], lc.position_buckets(longest, c.window))


def evaluate(model_cfg, params, sets: TestSets, with_ppl: bool = True) -> dict:
    longest = max(max(sets.retrieval), sets.lm_tokens.shape[1])
    model_cfg = dataclasses.replace(model_cfg, max_len=longest)  # evaluation reaches past the target
    out = {"accuracy": {str(L): float(ce.retrieval_hits(model_cfg, params, s).mean())
                        for L, s in sets.retrieval.items()}}
    if with_ppl:
        nll = np.concatenate([np.asarray(ce.token_nll(model_cfg, params, sets.lm_tokens[i:i + 4]))
                              for i in range(0, len(sets.lm_tokens), 4)])
        out["ppl_buckets"] = [float(x) for x in lc.bucket_perplexity(nll, sets.lm_mask, sets.edges)]
    return out


def entropy_curve(model_cfg, params, tokens) -> list:
    model_cfg = dataclasses.replace(model_cfg, max_len=tokens.shape[1])
    return np.asarray(ce.attention_entropy(model_cfg, params, tokens)).round(4).tolist()


# ----------------------------------------------------------------------------- the experiment

def extension(c, regime: str, method: str, lr: float, seed: int, epochs: int) -> ce.ContextExtensionConfig:
    sft = ce.SFTConfig(learning_rate=lr, batch_size=c.sft.batch_size, epochs=epochs, seed=seed)
    return ce.ContextExtensionConfig(method=method, target_len=c.factor * c.window,
                                     abf_base=c.regime[regime].abf_base,
                                     unscaled_layers=tuple(c.unscaled_layers), sft=sft)


def sft_data(c, task, stream, seed: int) -> dict:
    s = lc.retrieval_samples(np.random.default_rng(seed), c.sft.n_samples, c.factor * c.window, task, stream)
    return {"tokens": s["tokens"], "loss_mask": s["answer_mask"]}


def run_regime(c, regime: str, results: dict, save, clock: Clock):
    task = task_config(c)
    train_stream, val_stream = lc.corpus_stream("train", task.vocab), lc.corpus_stream("val", task.vocab)
    workdir = pathlib.Path(c.workdir)
    model_cfg = model_config(c, regime)
    with clock.phase("pretrain"):
        params = pretrain(c, model_cfg, workdir / f"pretrained_{regime}", task, train_stream)
    lengths = [k * c.window for k in c.eval.lengths]
    test = test_sets(c, task, val_stream, c.eval.test_seed, c.eval.n_retrieval, lengths)
    target = c.factor * c.window
    val = test_sets(c, task, val_stream, c.eval.val_seed, c.eval.n_val, [target])
    methods = c.methods.split(",")
    res = results.setdefault(regime, {})
    entropy_rows = test.lm_tokens[:c.eval.n_entropy_rows]

    def record(key, value):
        res[key] = value
        save()

    for method in methods:
        key = f"{method}/transform"
        if key not in res:
            with clock.phase("evaluate"):
                ext_cfg = ce.extended_config(model_cfg, extension(c, regime, method, 1.0, 0, 0))
                record(key, {**evaluate(ext_cfg, params, test), "entropy": entropy_curve(ext_cfg, params, entropy_rows)})
            print(f"[{regime}] {method:9s} transform-only: {res[key]['accuracy']}", flush=True)

    # Learning rate: seed 0 of every arm at each lr, validation accuracy at 4c.
    kept = {}
    for lr in ([] if c.sft.lr > 0 else c.sft.lr_grid):
        for method in methods:
            key = f"{method}/val_lr{lr:g}"
            if key in res:
                continue
            cfg = extension(c, regime, method, lr, 0, c.sft.epochs)
            with clock.phase("sft"):
                ext_cfg, new_params = ce.extend(params, model_cfg, sft_data(c, task, train_stream, 0), cfg,
                                               workdir / "sft" / regime / f"{method}_lr{lr:g}_seed0")
            with clock.phase("evaluate"):
                record(key, evaluate(ext_cfg, new_params, val, with_ppl=False)["accuracy"][str(target)])
            kept[(method, lr)] = (ext_cfg, new_params)
            print(f"[{regime}] {method:9s} lr {lr:g}: val accuracy@{target} {res[key]:.3f}", flush=True)
    if c.sft.lr > 0:
        lr = c.sft.lr
        record("lr", {"chosen": lr, "mean_val_accuracy": {}, "given": True})
    else:
        mean_val = {lr: float(np.mean([res[f"{m}/val_lr{lr:g}"] for m in methods])) for lr in c.sft.lr_grid}
        lr = max(c.sft.lr_grid, key=lambda x: (mean_val[x], -x))
        record("lr", {"chosen": lr, "mean_val_accuracy": {f"{k:g}": v for k, v in mean_val.items()}})
    print(f"[{regime}] SFT learning rate {lr:g} ({res['lr']})", flush=True)

    for method in methods:
        for seed in c.sft.seeds:
            key = f"{method}/sft_seed{seed}"
            if key in res and res[key].get("lr") == lr:
                continue
            cfg = extension(c, regime, method, lr, seed, c.sft.epochs)
            if (method, lr) in kept and seed == 0:
                ext_cfg, new_params = kept[(method, lr)]
                losses = None
            else:
                with clock.phase("sft"):
                    ext_cfg = ce.extended_config(model_cfg, cfg)
                    new_params, losses = ce.sft(params, ext_cfg, sft_data(c, task, train_stream, seed), cfg.sft,
                                                workdir / "sft" / regime / f"{method}_lr{lr:g}_seed{seed}")
            with clock.phase("evaluate"):
                out = {**evaluate(ext_cfg, new_params, test), "lr": lr, "sft_losses": losses}
                if seed == 0:
                    out["entropy"] = entropy_curve(ext_cfg, new_params, entropy_rows)
            record(key, out)
            print(f"[{regime}] {method:9s} seed {seed}: {out['accuracy']} ppl {np.round(out['ppl_buckets'], 2)}",
                  flush=True)


# ----------------------------------------------------------------------------- reporting

def summary(res: dict, methods, seeds, lengths) -> dict:
    """{method: {"transform": {...}, "sft": {"acc_mean", "acc_std", "ppl_mean"}}} per length/bucket."""
    out = {}
    for m in methods:
        runs = [res[f"{m}/sft_seed{s}"] for s in seeds]
        acc = np.array([[r["accuracy"][str(L)] for L in lengths] for r in runs])
        ppl = np.array([r["ppl_buckets"] for r in runs])
        out[m] = {"transform": res[f"{m}/transform"],
                  "sft": {"acc_mean": acc.mean(0), "acc_std": acc.std(0), "ppl_mean": ppl.mean(0)}}
    return out


def markdown(regime: str, c, res: dict, summ: dict, lengths) -> str:
    k = [f"{L // c.window}c={L}" for L in lengths]
    edges = lc.position_buckets(max(lengths), c.window)
    buckets = [f"[{lo},{hi})" for lo, hi in zip(edges[:-1], edges[1:])]
    lines = [f"### Regime `{regime}`: base {c.regime[regime].base:.1f}, ABF/EABF base "
             f"{c.regime[regime].abf_base:.0f}, SFT lr {res['lr']['chosen']:g}", "",
             f"Passkey accuracy (exact match of both value tokens, {c.eval.n_retrieval} rows per length; "
             f"SFT: mean ± std over seeds {list(c.sft.seeds)}):", "",
             "| method | variant | " + " | ".join(k) + " |", "|---|---|" + "---|" * len(k)]
    for m, s in summ.items():
        t = s["transform"]["accuracy"]
        lines.append(f"| {LABELS[m]} | transform only | " + " | ".join(f"{t[str(L)]:.3f}" for L in lengths) + " |")
        lines.append(f"| {LABELS[m]} | + SFT | " + " | ".join(
            f"**{a:.3f}** ± {sd:.3f}" for a, sd in zip(s["sft"]["acc_mean"], s["sft"]["acc_std"])) + " |")
    lines += ["", f"Perplexity by position bucket (corpus rows of {max(lengths)} characters; SFT: mean over seeds):",
              "", "| method | variant | " + " | ".join(buckets) + " |", "|---|---|" + "---|" * len(buckets)]
    for m, s in summ.items():
        lines.append(f"| {LABELS[m]} | transform only | " + " | ".join(
            f"{x:.2f}" for x in s["transform"]["ppl_buckets"]) + " |")
        lines.append(f"| {LABELS[m]} | + SFT | " + " | ".join(f"{x:.2f}" for x in s["sft"]["ppl_mean"]) + " |")
    if res["lr"].get("given"):
        lines += ["", f"SFT learning rate {res['lr']['chosen']:g} given in the config (no sweep in this regime).", ""]
    else:
        lines += ["", "Validation accuracy at 4c by SFT learning rate (seed 0, mean over arms): "
                  + ", ".join(f"{lr}: {v:.3f}" for lr, v in res["lr"]["mean_val_accuracy"].items()), ""]
    return "\n".join(lines)


def plot_accuracy(regime: str, summ: dict, lengths, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (m, s) in enumerate(summ.items()):
        color = f"C{i}"
        ax.errorbar(lengths, s["sft"]["acc_mean"], yerr=s["sft"]["acc_std"], color=color, marker="o",
                    capsize=3, label=f"{LABELS[m]} + SFT")
        ax.plot(lengths, [s["transform"]["accuracy"][str(L)] for L in lengths], color=color, ls=":", marker="x",
                alpha=0.6)
    ax.axvline(lengths[2], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("sequence length (pretrained window c = %d; SFT at %d)" % (lengths[0], lengths[2]))
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Context extension, regime '{regime}' (solid: + SFT, dotted: transform only)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_binned(curve, n_bins: int = 20):
    """(bin centres, means) of a per-position curve over geometric position bins (1-based i)."""
    curve = np.asarray(curve)
    edges = np.unique(np.geomspace(1, len(curve) + 1, n_bins + 1).astype(int))
    means = [curve[lo - 1:hi - 1].mean() for lo, hi in zip(edges[:-1], edges[1:])]
    return np.sqrt(edges[:-1] * np.maximum(edges[1:] - 1, edges[:-1])), np.asarray(means)


def plot_entropy(regime: str, res: dict, window: int, path):
    curves = {"pretrained (RoPE unchanged)": res["none/transform"]["entropy"],
              "ABF + SFT": res["abf/sft_seed0"]["entropy"],
              "EABF (layers 0-1 exempt) + SFT": res["eabf/sft_seed0"]["entropy"],
              "EABF (all layers) + SFT": res["eabf_all/sft_seed0"]["entropy"]}
    n_layers = len(next(iter(curves.values())))
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3.4), sharey=True)
    for layer, ax in enumerate(axes):
        for i, (name, curve) in enumerate(curves.items()):
            ax.plot(*log_binned(curve[layer]), color=f"C{i}", marker=".", lw=1.2, label=name)
        positions = np.arange(1, len(curve[layer]) + 1)
        ax.plot(positions, np.log(positions), "k:", lw=0.8, label="ln i (uniform attention)")
        ax.axvline(window, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("query position i")
    axes[0].set_ylabel("attention entropy (nats)")
    axes[-1].legend(fontsize=6)
    fig.suptitle(f"Attention entropy per layer, regime '{regime}' (mean over heads, 4 corpus rows, "
                 "geometric position bins; dashed: pretrained window)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    c = _CONFIG.value
    workdir, out = pathlib.Path(c.workdir), pathlib.Path(_OUT.value)
    workdir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    results_path = workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save():
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(results_path)

    clock = Clock()
    started_wall, started_cpu = time.time(), time.process_time()
    lengths = [k * c.window for k in c.eval.lengths]
    for regime in c.regimes.split(","):
        run_regime(c, regime, results, save, clock)
        summ = summary(results[regime], c.methods.split(","), c.sft.seeds, lengths)
        (out / f"results_{regime}.md").write_text(markdown(regime, c, results[regime], summ, lengths))
        plot_accuracy(regime, summ, lengths, out / f"accuracy_vs_length_{regime}.png")
        plot_entropy(regime, results[regime], c.window, out / f"attention_entropy_{regime}.png")
    timing = {name: {"wall_s": round(w, 1), "cpu_s": round(u, 1)} for name, (w, u) in clock.totals.items()}
    timing["total"] = {"wall_s": round(time.time() - started_wall, 1),
                       "cpu_s": round(time.process_time() - started_cpu, 1)}
    results.setdefault("timing", []).append(timing)
    save()
    print(f"timing (this invocation): {json.dumps(timing)}", flush=True)


if __name__ == "__main__":
    app.run(main)
