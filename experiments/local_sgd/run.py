r"""Runs the async Local-SGD mini-reproduction: the outer-lr sweep of every arm on the first seed,
every arm at its tuned lr for the other seeds, then the results table and the plots.

  python -m experiments.local_sgd.run --config=experiments/local_sgd/config.py --out=experiments/local_sgd/results

All training goes through `jaxllm.methods.local_sgd.run` (simulated timing, exact replay), so the
numbers depend only on the config and the seeds. Writes OUT/results.json (every history),
OUT/results.md (the table) and OUT/loss_vs_outer_updates.png, OUT/loss_vs_local_steps.png,
OUT/loss_vs_simulated_time.png.
"""
import json
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=wrong-import-position

from jaxllm.methods.local_sgd import LocalSGDConfig, lm_task, simulate, utilisation  # noqa: E402
from jaxllm.methods.local_sgd.runner import run  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/local_sgd/config.py", "Experiment config file.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", "experiments/local_sgd/results", "Output folder.")
LABELS = {"sync": "sync DiLoCo", "async_naive": "naive async (Nesterov per arrival)", "async_dn": "async + DN",
          "async_dn_dylu": "async + DN + DyLU"}


def _run_arm(c, lm, arm: str, seed: int, outer_lr: float | None = None, budget_factor: int = 1) -> dict:
    overrides = {"seed": seed, "total_local_steps": c.local_sgd.total_local_steps * budget_factor}
    overrides |= {"outer_lr": outer_lr} if outer_lr is not None else {}
    cfg = LocalSGDConfig.from_dict({**c.local_sgd.to_dict(), **c.arms[arm].to_dict(), **overrides})
    started = time.time()
    params, history = run(cfg, lm.params, lm.task, lm.eval_fn,
                          eval_every=c.eval_every_sync if cfg.mode == "sync" else c.eval_every_async)
    test_loss = lm.test_fn(params)
    events = simulate(cfg)
    record = {"arm": arm, "seed": seed, "outer_lr": cfg.outer_lr, "budget_factor": budget_factor,
              "history": history.to_dict(),
              "test_loss": test_loss, "test_perplexity": math.exp(test_loss), "wall_seconds": time.time() - started,
              "utilisation": utilisation(events, cfg.num_workers),
              "mean_staleness": float(np.mean([e.staleness for e in events])), "outer_updates": history.version[-1]}
    print(f"{arm:14s} seed {seed} lr {cfg.outer_lr} budget x{budget_factor}: val {history.eval_loss[-1]:.4f} test {test_loss:.4f} "
          f"sim {history.time[-1]:.0f} s, {record['wall_seconds']:.0f} s wall", flush=True)
    return record


def _time_to_reach(record: dict, target: float) -> float:
    """Simulated time of the first evaluation at or below `target` (NaN if never)."""
    h = record["history"]
    hits = [t for t, loss in zip(h["time"], h["eval_loss"]) if loss <= target]
    return hits[0] if hits else math.nan


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"


def _table(records: list[dict], arms: list[str], sweep: list[dict], extended: list[dict]) -> str:
    by = {(r["arm"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    lines = ["| arm | outer lr | final val loss | test loss | test ppl | Δ test vs sync (paired) | outer updates | "
             "simulated time (s) | time to sync's final val loss (s) | utilisation | mean staleness |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds]
        sync = [by[("sync", s)] for s in seeds]
        delta = [100 * (r["test_loss"] / q["test_loss"] - 1) for r, q in zip(rs, sync)]
        reach = [_time_to_reach(r, q["history"]["eval_loss"][-1]) for r, q in zip(rs, sync)]
        hit = [t for t in reach if not math.isnan(t)]
        reach_text = f"{np.mean(hit):.0f} ({len(hit)}/{len(rs)} seeds)" if hit else f"not reached (0/{len(rs)})"
        lines.append(
            f"| {LABELS[arm]} | {rs[0]['outer_lr']} | {_mean_std([r['history']['eval_loss'][-1] for r in rs])} | "
            f"{_mean_std([r['test_loss'] for r in rs])} | {np.mean([r['test_perplexity'] for r in rs]):.2f} | "
            f"{np.mean(delta):+.2f}% ({', '.join(f'{d:+.2f}' for d in delta)}) | {rs[0]['outer_updates']} | "
            f"{np.mean([r['history']['time'][-1] for r in rs]):.0f} | {reach_text} | "
            f"{rs[0]['utilisation']:.2f} | {rs[0]['mean_staleness']:.2f} |")
    if extended:
        sync_final = {s: by[("sync", s)]["history"]["eval_loss"][-1] for s in seeds}
        reach = [_time_to_reach(r, sync_final[r["seed"]]) for r in extended]
        sync_time = by[("sync", seeds[0])]["history"]["time"][-1]
        lines += ["", f"{LABELS[extended[0]['arm']]} with {extended[0]['budget_factor']}x the local-step budget: "
                  f"simulated time to reach sync DiLoCo's final validation loss (sync needs {sync_time:.0f} s): "
                  + ", ".join(f"seed {r['seed']}: {t:.0f} s" for r, t in zip(extended, reach))
                  + f"; final val loss {_mean_std([r['history']['eval_loss'][-1] for r in extended])}, "
                  f"test loss {_mean_std([r['test_loss'] for r in extended])}."]
    lrs = sorted({r["outer_lr"] for r in sweep})
    lines += ["", f"Outer-lr sweep (seed {seeds[0]}, final validation loss; the lowest per arm is used for every seed):",
              "", "| arm | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for arm in arms:
        losses = {r["outer_lr"]: r["history"]["eval_loss"][-1] for r in sweep if r["arm"] == arm}
        lines.append(f"| {LABELS[arm]} | " + " | ".join(f"{losses[lr]:.4f}" if lr in losses else "—" for lr in lrs)
                     + " |")
    return "\n".join(lines)


def _curve(ax, rs: list[dict], x_key: str, label: str, **style) -> None:
    """Mean over seeds with a min-max band (evaluation points are the same for every seed)."""
    if any(r["history"][x_key] != rs[0]["history"][x_key] for r in rs):
        raise ValueError(f"{label}: evaluation points differ across seeds; cannot average the curves")
    xs = np.asarray(rs[0]["history"][x_key], dtype=np.float64)
    ys = np.asarray([r["history"]["eval_loss"] for r in rs])
    lines = ax.plot(xs, ys.mean(0), marker=".", label=label, **style)
    ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.2, color=lines[0].get_color())


def _plot(records: list[dict], arms: list[str], x_key: str, xlabel: str, path: str,
          extended: list[dict] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in arms:
        _curve(ax, [r for r in records if r["arm"] == arm], x_key, LABELS[arm])
    if extended:
        _curve(ax, extended, x_key, f"{LABELS[extended[0]['arm']]}, {extended[0]['budget_factor']}x budget",
               linestyle="--", color="grey")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"mean over {len(records) // len(arms)} seeds (band: min-max)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c, out = _CONFIG.value, _OUT.value
    os.makedirs(out, exist_ok=True)
    started = time.time()
    lm_cfg = lm_task.CorpusLMConfig.from_dict(c.model.to_dict(), c.lm.to_dict())
    splits = lm_task.corpus_splits(lm_cfg)
    base = LocalSGDConfig.from_dict(c.local_sgd.to_dict())
    unknown = sorted(set(c.arms) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {list(LABELS)}")
    arms = [arm for arm in LABELS if arm in c.arms]  # sync first: the paired reference
    records, sweep, extended, tuned_lr = [], [], [], {}
    for seed in c.seeds:
        lm = lm_task.build(lm_cfg, splits, base, seed)
        print(f"seed {seed}: pretrained to train loss {lm.pretrain_loss:.4f}", flush=True)
        for arm in arms:
            if arm not in tuned_lr:  # first seed: sweep the outer lr, keep the best run
                runs = [_run_arm(c, lm, arm, seed, lr) for lr in c.outer_lr_grid]
                best = min(runs, key=lambda r: r["history"]["eval_loss"][-1])
                tuned_lr[arm] = best["outer_lr"]
                sweep += runs
                records.append(best)
            else:
                records.append(_run_arm(c, lm, arm, seed, tuned_lr[arm]))
        if c.extended_arm:
            extended.append(_run_arm(c, lm, c.extended_arm, seed, tuned_lr[c.extended_arm], c.extended_factor))
    wall = time.time() - started
    table = _table(records, arms, sweep, extended)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": c.to_dict(), "records": records, "sweep": sweep, "extended": extended,
                   "wall_seconds": wall}, f)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + f"\n\nTotal wall time: {wall:.0f} s\n")
    _plot(records, arms, "version", "outer updates (sync: rounds; async: arrivals)",
          os.path.join(out, "loss_vs_outer_updates.png"))
    _plot(records, arms, "local_steps", "synced local steps (all workers)", os.path.join(out, "loss_vs_local_steps.png"))
    _plot(records, arms, "time", "simulated wall-clock (s)", os.path.join(out, "loss_vs_simulated_time.png"),
          extended)
    print(table)
    print(f"total wall time {wall:.0f} s")


if __name__ == "__main__":
    app.run(main)
