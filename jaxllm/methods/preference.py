"""Preference training: a policy tuned on (prompt, chosen, rejected) pairs with CPO, DPO or SFT, on the
training stack (the jitted sharded step, orbax checkpoints, metrics.jsonl + TensorBoard, SIGTERM).

The recipe (DESIGN.md, loop seam) composes:

* the objective `jaxllm.objectives.preference.make_preference_loss` (CPO, DPO and their variants and
  NLL weights), or, with `objective=None`, SFT on the chosen side: the token-mean NLL of the chosen
  responses (`chosen_nll_loss`; SFT-on-preferred, or SFT-on-references when "chosen" holds references);
* a frozen reference for DPO, whose summed response log-probs are computed in one pass *before*
  training (`reference_logps`, no gradient) and travel in the batch, as the objective seam prescribes;
  they are stored in `workdir/reference_logps.npz` so a resumed run needs no reference model;
* `jaxllm.train.step.make_train_step` on a mesh (exact gradient accumulation of the token-mean NLL),
  `jaxllm.train.checkpoint.Checkpointer` (TrainState + pair-iterator position) and
  `jaxllm.train.metrics.MetricsWriter`, driven by `fit_preference`.

Pairs are numpy arrays [N, T] as `jaxllm.data.preference.collate_pairs` makes them (`pair_arrays`
tokenises text triplets). `complete` is a jitted sampler over the dense KV cache for prompts of
different lengths, used to generate the candidates that pairs are built from.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict as mlc

from jaxllm.data.preference import collate_pairs, tokenize_pair
from jaxllm.data.tasks import translation
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import llama
from jaxllm.objectives import lm
from jaxllm.objectives.preference import PreferenceConfig, make_preference_loss, make_reference_logps
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules
from jaxllm.train import checkpoint, metrics, optim
from jaxllm.train.config import MODEL_OVERRIDES, model_from_dict
from jaxllm.train.loop import sigterm_event
from jaxllm.train.state import TrainState, init_state
from jaxllm.train.step import make_train_step

OBJECTIVE_KINDS = ("cpo", "dpo", "sft")
PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
REFERENCE_FILE = "reference_logps.npz"


@dataclasses.dataclass(frozen=True)
class PreferenceTrainConfig:
    """A preference-training run.

    `objective`: the pair loss; None trains SFT on the chosen responses only. `batch_size` is the
    global number of pairs per optimizer step (split into `grad_accum` micro-batches). Each epoch
    visits the pairs in a fresh permutation drawn from `seed` (drop-last). Every `log_every` steps a
    record of window-mean metrics is written, every `checkpoint_every` steps a checkpoint (the last
    `keep_checkpoints` kept; one always at the end and on SIGTERM). `mesh` is a
    `jaxllm.parallel.mesh` spec.
    """

    model: llama.LlamaConfig
    objective: PreferenceConfig | None = PreferenceConfig()
    optimizer: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, min_lr_ratio=1.0,
                                                             weight_decay=0.01)
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    mesh: str = "fsdp:-1"

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")

    @property
    def needs_reference(self) -> bool:
        return self.objective is not None and self.objective.kind == "dpo"


# ----------------------------------------------------------------------------- objectives

def logits_fn(model_cfg: llama.LlamaConfig):
    """`(params, tokens_BT, positions_BT, segment_ids_BT) -> logits_BTV` of the Llama `model_cfg`."""
    return functools.partial(llama.forward, model_cfg)


def chosen_nll_loss(logits_fn):
    """SFT on pairs: loss_fn(params, batch, rng) -> ({"nll": (Σ chosen-token NLL, #chosen tokens)}, aux).

    Token-mean over the chosen responses of the whole (accumulated) batch, the same reduction as
    CPO's NLL term; only `chosen_*` keys are read and only the chosen side is run through the model."""

    def loss_fn(params, batch, rng):
        del rng  # no dropout
        tokens_BT, mask_BT = jnp.asarray(batch["chosen_tokens"]), jnp.asarray(batch["chosen_mask"])
        logits_BTV = logits_fn(params, tokens_BT, batch.get("chosen_positions"), batch.get("chosen_segment_ids"))
        numerator, denominator = lm.nll_loss(logits_BTV, tokens_BT, mask_BT)
        aux = {"nll_loss": jax.lax.stop_gradient(numerator / jnp.maximum(denominator, 1.0)),
               "logps/chosen": jax.lax.stop_gradient(jnp.mean(lm.sequence_logprobs(logits_BTV, tokens_BT, mask_BT))),
               "length/chosen": jnp.mean(jnp.sum(mask_BT[:, 1:], axis=-1).astype(jnp.float32))}
        return {"nll": (numerator, denominator)}, aux

    return loss_fn


def make_loss_fn(cfg: PreferenceTrainConfig):
    """The train-step loss_fn of `cfg.objective` (SFT on the chosen side when None)."""
    if cfg.objective is None:
        return chosen_nll_loss(logits_fn(cfg.model))
    return make_preference_loss(logits_fn(cfg.model), cfg.objective)


# ----------------------------------------------------------------------------- pair data

def pair_arrays(tokenizer, triplets: Sequence[tuple[str, str, str]], *, max_len: int, max_prompt_len: int,
                length: int | None = None, multiple: int = 8) -> dict[str, np.ndarray]:
    """(prompt, chosen, rejected) texts → padded pair arrays [N, T] (joint tokenisation, EOS, masks;
    see `jaxllm.data.preference`). T is `length`, else the longest pair rounded up to `multiple`."""
    if not triplets:
        raise ValueError("no preference triplets to tokenise")
    pairs = [tokenize_pair(tokenizer, p, c, r, max_len=max_len, max_prompt_len=max_prompt_len) for p, c, r in triplets]
    return collate_pairs(pairs, pad_id=tokenizer.pad_id, length=length, multiple=multiple)


def read_triplets(path: str | os.PathLike, keys=("prompt", "chosen", "rejected")) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts from a JSON-lines file, one object per line with `keys`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file {path} does not exist")
    triplets = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = [k for k in keys if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{number} lacks text fields {missing}")
        triplets.append(tuple(record[k] for k in keys))
    return triplets


PAIR_SOURCES = ("translation", "jsonl")


@dataclasses.dataclass(frozen=True)
class PairDataConfig:
    """Where a launched run's pairs come from.

    "translation": the toy task of `jaxllm.data.tasks.translation` — `num_sources` sources drawn from
    `seed`, candidates = gilded reference + synthetic systems with `system_error_rates` (comma-separated
    sentence error rates), best vs worst by oracle chrF. "jsonl": `files` (comma-separated) of
    {"prompt", "chosen", "rejected"} texts, tokenised with the SentencePiece model `tokenizer` ("" = the
    shipped one). Rows are `max_len` tokens, prompts cut from the left to `max_prompt_len`.
    """

    source: str = "translation"
    files: str = ""
    tokenizer: str = ""
    num_sources: int = 1000
    system_error_rates: str = "0.1,0.25"
    seed: int = 0
    max_len: int = 32
    max_prompt_len: int = 16

    def __post_init__(self):
        if self.source not in PAIR_SOURCES:
            raise ValueError(f"data.source must be one of {PAIR_SOURCES}, got {self.source!r}")
        if self.source == "jsonl" and not self.files:
            raise ValueError("data.source 'jsonl' needs data.files (comma-separated paths), got ''")
        if not 0 < self.max_prompt_len < self.max_len:
            raise ValueError(f"need 0 < data.max_prompt_len < data.max_len, got {self.max_prompt_len}, {self.max_len}")


def load_pairs(cfg: PairDataConfig) -> tuple[dict[str, np.ndarray], int]:
    """(pair arrays [N, max_len], tokenizer vocab size) of the source `cfg` names."""
    if cfg.source == "translation":
        task = translation.TranslationTask()
        tokenizer = task.tokenizer()
        rates = [float(r) for r in cfg.system_error_rates.split(",") if r.strip()]
        sources = task.sources({"train": cfg.num_sources}, cfg.seed)["train"]
        triplets = translation.synthetic_triplets(task, sources, np.random.default_rng(cfg.seed), rates)
    else:
        tokenizer = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else Tokenizer.default()
        triplets = [t for f in cfg.files.split(",") if f.strip() for t in read_triplets(f.strip())]
    pairs = pair_arrays(tokenizer, triplets, max_len=cfg.max_len, max_prompt_len=cfg.max_prompt_len, length=cfg.max_len)
    return pairs, tokenizer.vocab_size


def _check_pairs(pairs: Mapping[str, np.ndarray], needs_rejected: bool) -> int:
    required = PAIR_KEYS if needs_rejected else PAIR_KEYS[:2]
    missing = [k for k in required if k not in pairs]
    if missing:
        raise ValueError(f"pair data lacks {missing}; it has {sorted(pairs)}")
    sizes = {k: np.shape(v)[0] for k, v in pairs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"pair arrays disagree on the number of pairs: {sizes}")
    return next(iter(sizes.values()))


class PairBatches(grain.DatasetIterator):
    """Endless batches of `batch_size` rows of `pairs` (dict of arrays with a leading N axis): each
    epoch a permutation drawn from (seed, epoch), incomplete last batch dropped. The position is
    `get_state()` / `set_state()` (JSON), which `jaxllm.train.checkpoint.Checkpointer` saves with the
    TrainState (a grain iterator), so a resumed run continues on the very next batch."""

    def __init__(self, pairs: Mapping[str, np.ndarray], batch_size: int, seed: int):
        super().__init__()
        self.pairs = {k: np.asarray(v) for k, v in pairs.items()}
        self.num_rows = _check_pairs(self.pairs, needs_rejected=False)
        if not 1 <= batch_size <= self.num_rows:
            raise ValueError(f"batch_size {batch_size} must be in [1, number of pairs {self.num_rows}]")
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.index = 0, 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index + self.batch_size > self.num_rows:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        rows = order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return {k: v[rows] for k, v in self.pairs.items()}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def _pairs_digest(pairs: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in PAIR_KEYS:
        digest.update(np.ascontiguousarray(pairs[key]).tobytes())
    return digest.hexdigest()


def reference_logps(model_cfg: llama.LlamaConfig, ref_params, pairs: Mapping[str, np.ndarray], *,
                    batch_size: int = 64) -> dict[str, np.ndarray]:
    """The frozen reference's summed response log-probs of every pair: {"ref_chosen_logps",
    "ref_rejected_logps"} float32 [N], in one jitted pass of `batch_size` pairs (the last batch
    padded with repeats, so one shape compiles)."""
    n = _check_pairs(pairs, needs_rejected=True)
    ref_fn = jax.jit(make_reference_logps(logits_fn(model_cfg)))
    out = {"ref_chosen_logps": [], "ref_rejected_logps": []}
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        logps = jax.device_get(ref_fn(ref_params, {k: np.asarray(v)[rows] for k, v in pairs.items()}))
        for key in out:
            out[key].append(logps[key][:min(batch_size, n - start)])
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def _with_reference(cfg: PreferenceTrainConfig, pairs, workdir: pathlib.Path, reference_params) -> dict:
    """`pairs` plus the reference log-probs, read from workdir when an earlier call stored them for the
    same pairs, else computed from `reference_params` and stored."""
    path = workdir / REFERENCE_FILE
    digest = _pairs_digest(pairs)
    if path.exists():
        stored = np.load(path)
        if str(stored["digest"]) != digest:
            raise ValueError(f"{path} holds reference log-probs of different pairs; use a fresh workdir")
        return {**pairs, "ref_chosen_logps": stored["ref_chosen_logps"], "ref_rejected_logps": stored["ref_rejected_logps"]}
    if reference_params is None:
        raise ValueError("DPO needs reference params (or a workdir with stored reference log-probs), got None")
    logps = reference_logps(cfg.model, reference_params, pairs)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, digest=np.asarray(digest), **logps)
    os.replace(tmp, path)
    return {**pairs, **logps}


# ----------------------------------------------------------------------------- parameters

def param_shardings(model_cfg: llama.LlamaConfig, mesh) -> Any:
    """NamedShardings of the model's params on `mesh` by the logical rules."""
    mesh_rules = rules.mesh_rules(rules.DEFAULT_RULES, mesh)
    model = llama.Llama(model_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules):
        abstract = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)), jax.random.key(0))
    return rules.param_shardings(abstract, mesh, mesh_rules)["params"]


def init_params(model_cfg: llama.LlamaConfig, seed: int, mesh) -> Any:
    """Random params of `model_cfg`, born sharded on `mesh`."""
    model = llama.Llama(model_cfg)
    variables, _ = rules.init_sharded(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)), mesh,
                                      rules.DEFAULT_RULES, jax.random.key(seed))
    return variables["params"]


def load_params(directory: str | os.PathLike, model_cfg: llama.LlamaConfig, mesh) -> Any:
    """The params of the newest checkpoint in `directory` (e.g. a pre-training workdir's
    `checkpoints`), restored alone onto `mesh` and verified (`checkpoint.restore_params`)."""
    abstract = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            param_shardings(model_cfg, mesh),
                            jax.eval_shape(lambda: llama.init_params(model_cfg, jax.random.key(0))))
    return checkpoint.restore_params(directory, abstract)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class PreferenceFitResult:
    """The final state, one record per logged window (step, window means of every step metric,
    learning_rate, step_time_s), and whether the run stopped early on SIGTERM."""

    state: TrainState
    history: list[dict]
    preempted: bool


def _finite_or_raise(step: int, host: dict, last_good: int | None) -> None:
    if host["finite"] == 0.0:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step} (loss {host['loss']}, grad norm {host['grad_norm']}); "
            f"training stopped, nothing saved after the last good checkpoint (step {last_good})")


def fit_preference(cfg: PreferenceTrainConfig, pairs: Mapping[str, np.ndarray], workdir: str | os.PathLike, *,
                   params=None, reference_params=None, devices: Sequence[jax.Device] | None = None,
                   until_step: int | None = None, verbose: bool = True) -> PreferenceFitResult:
    """Trains `cfg` on `pairs` in `workdir`, resuming from its newest good checkpoint.

    `params`: the policy's starting point (host or device arrays, copied; None: random init from `cfg.seed`).
    `reference_params`: DPO's frozen reference (default: the starting params); its log-probs are
    computed once before the first step and stored in the workdir. `until_step` ends this call early,
    with a checkpoint (the schedule still spans `cfg.steps`). Raises FloatingPointError naming the step
    at a non-finite loss, ValueError on data that does not fit the config or mesh.
    """
    last = cfg.steps if until_step is None else until_step
    if not 1 <= last <= cfg.steps:
        raise ValueError(f"until_step must be in [1, steps={cfg.steps}], got {until_step}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_pairs(pairs, needs_rejected=cfg.objective is not None)
    mesh = mesh_lib.make_mesh(cfg.mesh, list(jax.devices() if devices is None else devices))
    data_parallel, processes = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
    if (cfg.batch_size // cfg.grad_accum) % data_parallel or cfg.batch_size % processes:
        raise ValueError(f"batch_size {cfg.batch_size} (micro-batch {cfg.batch_size // cfg.grad_accum}) does not "
                         f"split over the data-parallel size {data_parallel} and {processes} processes")

    if params is None:
        params = init_params(cfg.model, cfg.seed, mesh)
    else:  # a copy: the train step donates its state, the caller keeps its params
        params = jax.device_put(params, param_shardings(cfg.model, mesh), may_alias=False)
    if cfg.needs_reference:
        pairs = _with_reference(cfg, pairs, workdir, params if reference_params is None else reference_params)
    batches = PairBatches(pairs, cfg.batch_size, cfg.seed)

    optimizer, schedule = optim.make_optimizer(cfg.optimizer, cfg.steps)
    state = init_state(params, optimizer, jax.random.key(cfg.seed + 1))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    restored = ckpt.restore_latest(checkpoint.abstract_like(state), batches)
    if restored is not None:
        state = restored
        if verbose:
            print(f"resumed from step {int(state.step)} in {ckpt.directory}", flush=True)
    start = int(state.step)

    batch_sharding = rules.logical_sharding(("batch",), mesh)
    step_fn = make_train_step(make_loss_fn(cfg), optimizer, mesh, grad_accum=cfg.grad_accum,
                              batch_sharding=batch_sharding)
    per_process = cfg.batch_size // processes
    lo = jax.process_index() * per_process

    def global_batch(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v[lo:lo + per_process])
                for k, v in batch.items()}

    writer = metrics.MetricsWriter(workdir, start)
    history: list[dict] = []
    window: list[dict] = []
    window_start = time.perf_counter()
    preempted = False
    try:
        with sigterm_event() as stop:
            for step in range(start + 1, last + 1):
                state, device_metrics = step_fn(state, global_batch(next(batches)))
                host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
                _finite_or_raise(step, host, ckpt.latest_step)
                window.append(host)
                stopping = stop.is_set()
                if step % cfg.log_every == 0 or step == last:
                    elapsed = time.perf_counter() - window_start
                    record = {k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "finite"}
                    record.update(learning_rate=float(schedule(step - 1)), step_time_s=elapsed / len(window))
                    writer.write(step, record)
                    history.append({"step": step, **record})
                    if verbose:
                        print(metrics.progress_line(step, cfg.steps, record), flush=True)
                    window, window_start = [], time.perf_counter()
                if step % cfg.checkpoint_every == 0 or step == last or stopping:
                    save_start = time.perf_counter()
                    ckpt.save(state, batches)
                    window_start += time.perf_counter() - save_start
                if stopping:
                    ckpt.wait()
                    print(f"SIGTERM: checkpoint at step {step} saved in {ckpt.directory}; stopping", flush=True)
                    preempted = True
                    break
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    return PreferenceFitResult(state=state, history=history, preempted=preempted)


# ----------------------------------------------------------------------------- candidates

@functools.partial(jax.jit, static_argnames=("cfg", "num_steps"))
def _complete(cfg: llama.LlamaConfig, params, prompt_BP, prompt_len_B, rng, temperature, num_steps: int):
    """Full sequences [B, num_steps + 1]: one token per row per step through the dense KV cache; while a
    row is inside its prompt the next input is its prompt token, afterwards the picked token."""
    model = llama.Llama(cfg)
    B, P = prompt_BP.shape
    prompt_BS = jnp.pad(prompt_BP, ((0, 0), (0, num_steps + 1 - P)))

    def body(carry, xs):
        cache, token_B = carry
        t, key = xs
        logits_B1V, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
        logits_BV = logits_B1V[:, 0]
        sampled_B = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
        picked_B = jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)
        next_B = jnp.where(t + 1 < prompt_len_B, prompt_BS[:, t + 1], picked_B)
        return (cache, next_B), next_B

    cache = llama.init_cache(cfg, B, num_steps)
    _, tokens_SB = jax.lax.scan(body, (cache, prompt_BP[:, 0]),
                                (jnp.arange(num_steps), jax.random.split(rng, num_steps)))
    return jnp.concatenate([prompt_BP[:, :1], tokens_SB.T], axis=1)


def complete(model_cfg: llama.LlamaConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             eos_id: int, temperature: float = 0.0, rng=None, batch_size: int = 128) -> list[list[int]]:
    """Continuations of token-id prompts of any lengths: greedy at temperature 0, else sampled from
    softmax(logits / temperature). Each continuation stops before the first `eos_id` or after
    `max_new_tokens`. Prompts run in batches of `batch_size` (the last padded), one compile per
    (batch_size, longest prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("complete needs at least one prompt and no empty prompts")
    if max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 1 and temperature >= 0, got {max_new_tokens}, {temperature}")
    longest = max(len(p) for p in prompts)
    num_steps = longest + max_new_tokens - 1
    if num_steps + 1 > model_cfg.max_len:
        raise ValueError(f"longest prompt {longest} + max_new_tokens {max_new_tokens} exceeds max_len {model_cfg.max_len}")
    rng = jax.random.key(0) if rng is None else rng
    prompt_NP = np.zeros((len(prompts), longest), np.int32)
    for i, p in enumerate(prompts):
        prompt_NP[i, :len(p)] = p
    lengths_N = np.asarray([len(p) for p in prompts], np.int32)
    out = []
    for chunk, start in enumerate(range(0, len(prompts), batch_size)):
        rows = np.minimum(np.arange(start, start + batch_size), len(prompts) - 1)
        seqs = np.asarray(_complete(model_cfg, params, prompt_NP[rows], lengths_N[rows], jax.random.fold_in(rng, chunk),
                                    jnp.float32(temperature), num_steps))
        for row in range(min(batch_size, len(prompts) - start)):
            new = seqs[row, lengths_N[start + row]:lengths_N[start + row] + max_new_tokens].tolist()
            out.append(new[:new.index(eos_id)] if eos_id in new else new)
    return out


# ----------------------------------------------------------------------------- config files

def _objective_fields() -> dict:
    hints = typing.get_type_hints(PreferenceConfig)
    defaults = dataclasses.asdict(PreferenceConfig())
    return {name: mlc.placeholder(float) if name == "nll_weight" else defaults[name] for name in hints}


def config_dict(*, model: Mapping[str, Any], objective: Mapping[str, Any] | None = None,
                optimizer: Mapping[str, Any] | None = None, **fields) -> ml_collections.ConfigDict:
    """A complete ConfigDict for `PreferenceTrainConfig.from_dict`: every field present with its default
    (model overrides as typed placeholders; `objective.nll_weight` None = the kind's default;
    `objective.kind` "sft" = no preference term), so absl `--config.x.y=...` overrides work and misspelt
    fields fail. Extra top-level sections (e.g. `data`, `init_checkpoint`) pass through `fields`."""
    model = dict(model)
    if "preset" not in model:
        raise ValueError("model needs a 'preset'")
    unknown = set(model) - set(MODEL_OVERRIDES) - {"preset"}
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(MODEL_OVERRIDES)}")
    hints = typing.get_type_hints(llama.LlamaConfig)
    model_fields = {name: model[name] if name in model else mlc.placeholder(hints[name]) for name in MODEL_OVERRIDES}
    objective_fields = {**_objective_fields(), **dict(objective or {})}
    optimizer_fields = {**dataclasses.asdict(PreferenceTrainConfig.optimizer), **dict(optimizer or {})}
    top = {f.name: f.default for f in dataclasses.fields(PreferenceTrainConfig)
           if f.name not in ("model", "objective", "optimizer")}
    return ml_collections.ConfigDict({"model": {"preset": model["preset"], **model_fields},
                                      "objective": objective_fields, "optimizer": optimizer_fields,
                                      **top, **fields})


def from_dict(d: Mapping[str, Any]) -> PreferenceTrainConfig:
    """`PreferenceTrainConfig` from a nested mapping shaped like `config_dict()` (sections other than
    model/objective/optimizer and the config's own fields are ignored: they belong to the caller)."""
    d = dict(d)
    model = model_from_dict(d.get("model") or {})
    objective = dict(d.get("objective") or {})
    kind = objective.get("kind", "cpo")
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(f"unknown objective kind {kind!r}; known: {list(OBJECTIVE_KINDS)}")
    optimizer = dict(d.get("optimizer") or {})
    for section, values, cls in (("objective", objective, PreferenceConfig), ("optimizer", optimizer, optim.OptimizerConfig)):
        known = {f.name for f in dataclasses.fields(cls)}
        if set(values) - known:
            raise ValueError(f"unknown {section} fields {sorted(set(values) - known)}; known: {sorted(known)}")
    fields = {f.name for f in dataclasses.fields(PreferenceTrainConfig)} - {"model", "objective", "optimizer"}
    return PreferenceTrainConfig(
        model=model,
        objective=None if kind == "sft" else PreferenceConfig(**objective),
        optimizer=optim.OptimizerConfig(**optimizer),
        **{k: v for k, v in d.items() if k in fields})
