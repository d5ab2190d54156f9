"""The Self-Rewarding loop (arXiv 2401.10020 §2): M0 → M1 by joint SFT on IFT ∪ EFT, then per
iteration t: prompts from a fixed generator → N candidates from M_t (T 0.7, top-p 0.9) → M_t
judges them (`judging.judge`) → best-vs-worst pairs (`pairs.build_pairs`) → DPO from M_t with
π_ref = M_t snapshotted at the start of the iteration → M_{t+1}. The paper stops at M3.

All sampling goes through one `jaxllm.serve.Engine` whose weights are swapped per model; all
training through `jaxllm.methods.preference.fit_preference` on the one loop (`training`). `run`
saves every M_t as a model directory (`jaxllm.model.model_dir`) with its `IterationReport`, and a
rerun continues after the last saved model. The prompt source is pluggable (`prompt_source(iteration, n) -> prompts`), e.g.
`jaxllm.data.tasks.instructions.PromptGenerator`; the trained model never writes its prompts.
`reward_fn(prompts, candidates) -> scores [P, N]` replaces the model's own judge (e.g. the
oracle-reward control); by default the model judges itself.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxllm.methods.self_rewarding import training
from jaxllm.methods.self_rewarding.judging import JudgeConfig, check_context, judge
from jaxllm.methods.self_rewarding.pairs import PairStats, build_pairs
from jaxllm.model import llama
from jaxllm.objectives.preference import PreferenceConfig
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams
from jaxllm.model import model_dir

RewardFn = Callable[[Sequence[str], Sequence[Sequence[str]]], np.ndarray]
PromptSource = Callable[[int, int], Sequence[str]]
REPORT_FILE = "report.json"


@dataclasses.dataclass(frozen=True)
class SelfRewardingConfig:
    """The paper's settings by default: N = 4 candidates at T 0.7 / top-p 0.9, the judge's 3
    samples, DPO β 0.1 (no NLL term), M1 → M3 (`iterations` = 2). `prompts_per_iteration` new
    prompts per iteration; `sft` / `dpo_stage` size the two trainings."""

    judge: JudgeConfig
    num_candidates: int = 4
    gen_temperature: float = 0.7
    gen_top_p: float = 0.9
    max_new_tokens: int = 256
    iterations: int = 2
    prompts_per_iteration: int = 64
    dpo: PreferenceConfig = PreferenceConfig(kind="dpo", beta=0.1, nll_weight=0.0)
    sft: training.StageConfig = training.StageConfig()
    dpo_stage: training.StageConfig = training.StageConfig()
    seed: int = 0

    def __post_init__(self):
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2 to form a pair, got {self.num_candidates}")
        if self.dpo.kind != "dpo":
            raise ValueError(f"dpo must be a PreferenceConfig of kind 'dpo', got {self.dpo.kind!r}")
        if self.iterations < 0 or self.prompts_per_iteration < 1 or self.max_new_tokens < 1:
            raise ValueError(f"need iterations >= 0, prompts_per_iteration >= 1 and max_new_tokens >= 1, got "
                             f"{self.iterations}, {self.prompts_per_iteration}, {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class IterationReport:
    """What one iteration did: its pair statistics, the judge's per-sample parse-failure rate
    (NaN with a `reward_fn`), the mean candidate length (characters), DPO's first and last step
    losses (the first is ln 2: π_θ = π_ref at step 1) and the wall time."""

    iteration: int
    pairs: PairStats
    judge_parse_failure_rate: float
    mean_candidate_len: float
    dpo_first_loss: float
    dpo_last_loss: float
    seconds: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> IterationReport:
        stats = d["pairs"]
        return cls(**{**d, "pairs": PairStats(**{**stats, "score_histogram": tuple(stats["score_histogram"])})})


class NoPairsError(ValueError):
    """An iteration produced no preference pair; `stats` says why (ties, parse failures)."""

    def __init__(self, iteration: int, stats: PairStats):
        super().__init__(f"iteration {iteration} produced no preference pairs, nothing to train on: {stats}")
        self.stats = stats


def make_engine(model_cfg: llama.LlamaConfig, params, *, max_seqs: int = 64) -> Engine:
    """The engine every sample of the loop goes through (weights swapped with `set_params`)."""
    return Engine(model_cfg, params, max_model_len=model_cfg.max_len, max_seqs=max_seqs)


def generate_candidates(engine: Engine, tokenizer, prompts: Sequence[str], cfg: SelfRewardingConfig, *,
                        seed: int) -> list[list[str]]:
    """`cfg.num_candidates` sampled responses per prompt (EOS stripped) from the engine's params."""
    ids = [training.prompt_ids(tokenizer, p) for p in prompts]
    check_context(engine, ids, cfg.max_new_tokens, "prompt")
    sampling = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature, top_p=cfg.gen_top_p,
                              stop_tokens=(tokenizer.eos_id,), seed=seed, n=cfg.num_candidates)
    out = engine.generate(ids, sampling)
    texts = [tokenizer.decode(c.tokens) for c in out]
    return [texts[i * cfg.num_candidates:(i + 1) * cfg.num_candidates] for i in range(len(prompts))]


def run_iteration(model_cfg: llama.LlamaConfig, params, tokenizer, prompts: Sequence[str], cfg: SelfRewardingConfig,
                  *, iteration: int, workdir, engine: Engine | None = None, reward_fn: RewardFn | None = None,
                  devices=None) -> tuple[dict, IterationReport]:
    """M_t = `params` → (M_{t+1} host params, report). Raises `NoPairsError` (with the stats) when
    no prompt yields a pair, ValueError when a prompt does not fit the engine's context."""
    start = time.perf_counter()
    seed = cfg.seed * 1000 + iteration
    engine = engine or make_engine(model_cfg, params)
    engine.set_params(params)
    candidates = generate_candidates(engine, tokenizer, prompts, cfg, seed=seed)
    parse_failure = math.nan
    if reward_fn is None:
        items = [(p, c) for p, cands in zip(prompts, candidates) for c in cands]
        judged = judge(engine, tokenizer, items, cfg.judge, seed=seed)
        scores = judged.scores.reshape(len(prompts), cfg.num_candidates)
        parse_failure = judged.parse_failure_rate
    else:
        scores = np.asarray(reward_fn(prompts, candidates), np.float64)
    pairs, stats = build_pairs(prompts, candidates, scores)
    if not pairs:
        raise NoPairsError(iteration, stats)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "pairs.jsonl", "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(dataclasses.asdict(p)) + "\n")
    rows = training.pair_arrays(tokenizer, [(p.prompt, p.chosen, p.rejected) for p in pairs], cfg.dpo_stage.seq_len)
    new_params, _, result = training.train_dpo(model_cfg, params, rows, cfg.dpo_stage, cfg.dpo, seed=seed,
                                               workdir=workdir / "dpo", devices=devices)
    losses = [result.losses[s] for s in sorted(result.losses)]
    report = IterationReport(
        iteration=iteration, pairs=stats, judge_parse_failure_rate=float(parse_failure),
        mean_candidate_len=float(np.mean([len(c) for cands in candidates for c in cands])),
        dpo_first_loss=losses[0] if losses else math.nan, dpo_last_loss=losses[-1] if losses else math.nan,
        seconds=time.perf_counter() - start)
    return new_params, report


def _model_path(workdir: pathlib.Path, t: int) -> pathlib.Path:
    return workdir / f"M{t}"


def run(model_cfg: llama.LlamaConfig, params0, tokenizer, sft_examples: Sequence[tuple[str, str]],
        prompt_source: PromptSource, cfg: SelfRewardingConfig, workdir, *, reward_fn: RewardFn | None = None,
        engine: Engine | None = None, devices=None, verbose: bool = True) -> list[IterationReport]:
    """M0 = `params0` → M1 (SFT on `sft_examples`: IFT ∪ EFT as (user text, target)) → M2 → ... →
    M_{1 + cfg.iterations}, each saved as `workdir/M{t}` (model directory + report.json). A rerun
    loads the newest saved model and continues. Returns the iterations' reports. `engine`: an
    engine for `model_cfg` to reuse (its compiled shapes), else one is made."""
    workdir = pathlib.Path(workdir)
    m1 = _model_path(workdir, 1)
    if not (m1 / model_dir.CONFIG_FILE).exists():
        rows = training.sft_arrays(tokenizer, sft_examples, cfg.sft.seq_len)
        params, _ = training.train_sft(model_cfg, params0, rows, cfg.sft, seed=cfg.seed, workdir=workdir / "sft",
                                       devices=devices)
        model_dir.save_model(m1, model_cfg, params)
    reports, params = [], None
    for t in range(1, cfg.iterations + 1):
        path = _model_path(workdir, t + 1)
        if (path / model_dir.CONFIG_FILE).exists() and (path / REPORT_FILE).exists():
            reports.append(IterationReport.from_json(json.loads((path / REPORT_FILE).read_text())))
            params = None
            continue
        if params is None:
            _, params = model_dir.load_model(_model_path(workdir, t))
        engine = engine or make_engine(model_cfg, params)
        prompts = list(prompt_source(t, cfg.prompts_per_iteration))
        params, report = run_iteration(model_cfg, params, tokenizer, prompts, cfg, iteration=t,
                                       workdir=workdir / f"iteration{t}", engine=engine, reward_fn=reward_fn,
                                       devices=devices)
        model_dir.save_model(path, model_cfg, params)
        (path / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=1))
        reports.append(report)
        if verbose:
            print(f"M{t} -> M{t + 1}: {report}", flush=True)
    return reports
