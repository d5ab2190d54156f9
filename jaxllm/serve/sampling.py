"""Sampling parameters, the batched sampler, and LogitsFn transforms (the *logits* seam).

A `LogitsFn` is `(params, tokens_T, positions_T, cache) -> (logits_SV, cache)` over one flat
ragged pass (one logits row per sequence slot). Transforms take LogitsFns and return one:
`map_logits`, `suppress_tokens`, and `proxy_tuned` (base + α·(expert − anti), arXiv 2401.08565).

Per-request processing happens in `sample`, after every LogitsFn transform, so a proxy-tuned
ensemble is processed once, after combination: penalties and logit bias (`LogitAdjust`, only in
passes where a request asks for them), then warping (temperature → top-k → top-p). `sample`
reports the log-probability of each sampled token under the distribution it was drawn from (the
processed one), which is what RL needs as the behaviour log-prob, and the top alternatives of
that distribution for requests asking for `logprobs`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[Any, Any, Any, Any], tuple[jax.Array, Any]]
MAX_LOGPROBS = 20  # top alternatives a request may ask for (OpenAI's limit); the device always returns this many


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 is greedy. top_k 0 and top_p 1 disable those filters. Generation ends after
    `max_tokens` tokens or at the first token in `stop_tokens` (which is kept in the output).
    `n` independent samples are returned per request; the random stream of sample j at output
    token t depends only on (seed, request index, j, t), never on batching or scheduling. With
    `best_of` (>= n) that many samples are drawn and the n of highest total log-probability kept.
    `stop` strings end a sample when its text contains one (the text is cut before it; needs an
    Engine with a tokenizer). `logprobs` (0..MAX_LOGPROBS): how many top alternatives of the
    processed distribution to report per token.

    Penalties act on the logits before warping: `repetition_penalty` as in HF transformers'
    RepetitionPenaltyLogitsProcessor (over prompt and output tokens: positive logits divided by
    it, negative ones multiplied), then OpenAI's `presence_penalty` / `frequency_penalty` (over
    output tokens: minus presence for a token seen, minus frequency times its count), then
    `logit_bias` ({token id: bias} added). A pass with such a request ships dense [S, V] inputs
    (`LogitAdjust`) and runs its own compiled variant of the engine step (compiled on first use).
    """
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    seed: int = 0
    n: int = 1
    best_of: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_tokens, (int, np.integer)) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        stop = tuple(self.stop_tokens)
        bad = [t for t in stop if not isinstance(t, (int, np.integer)) or t < 0]
        if bad:
            raise ValueError(f"stop_tokens must be non-negative token ids, got {bad[0]!r}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in stop))
        if self.best_of is not None and (not isinstance(self.best_of, (int, np.integer)) or self.best_of < self.n):
            raise ValueError(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(x, str) or not x for x in strings):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", strings)
        if not isinstance(self.logprobs, (int, np.integer)) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty!r}")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        bias = tuple(sorted((int(t), float(b)) for t, b in bias))
        bad = [(t, b) for t, b in bias if t < 0 or not -100.0 <= b <= 100.0]
        if bad:
            raise ValueError(f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {bad[0]!r}")
        object.__setattr__(self, "logit_bias", bias)

    @property
    def num_samples(self) -> int:
        """Samples drawn: best_of, or n."""
        return self.best_of or self.n

    @property
    def adjusts_logits(self) -> bool:
        """Whether the request needs a `LogitAdjust` (penalties or bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """Per-row sampling inputs of one pass (NumPy on host, arrays on device).

    `request_S`, `sample_index_S` and `token_index_S` (index of the token being sampled in the
    sequence's output) together with `seed_S` fix each row's random key.
    """
    temperature_S: jax.Array
    top_k_S: jax.Array
    top_p_S: jax.Array
    seed_S: jax.Array
    request_S: jax.Array
    sample_index_S: jax.Array
    token_index_S: jax.Array
    num_logprobs_S: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogitAdjust:
    """Penalty and bias inputs of one pass (only built when a row asks for them): per row and
    vocabulary entry the output-token counts, whether the token is in the prompt, and the logit
    bias; per row the three penalties."""
    counts_SV: jax.Array
    in_prompt_SV: jax.Array
    bias_SV: jax.Array
    presence_S: jax.Array
    frequency_S: jax.Array
    repetition_S: jax.Array


def logit_adjust(params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
                 outputs: Sequence[Sequence[int]], num_rows: int, vocab_size: int) -> LogitAdjust:
    """Host-side LogitAdjust for the given rows (prompt and output token ids), padded to `num_rows`."""
    counts_SV = np.zeros((num_rows, vocab_size), np.float32)
    in_prompt_SV = np.zeros((num_rows, vocab_size), bool)
    bias_SV = np.zeros((num_rows, vocab_size), np.float32)
    scalars = np.zeros((3, num_rows), np.float32)
    scalars[2] = 1.0
    for s, (p, prompt, output) in enumerate(zip(params, prompts, outputs)):
        if not p.adjusts_logits:
            continue
        np.add.at(counts_SV[s], np.asarray(output, np.int64), 1.0)
        in_prompt_SV[s, np.asarray(prompt, np.int64)] = True
        for t, b in p.logit_bias:
            bias_SV[s, t] = b
        scalars[:, s] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
    return LogitAdjust(counts_SV, in_prompt_SV, bias_SV, *scalars)


def adjust_logits(logits_SV: jax.Array, adjust: LogitAdjust) -> jax.Array:
    """Penalised and biased logits (float32): HF repetition penalty over prompt and output tokens,
    OpenAI presence/frequency penalties over output tokens, then the logit bias."""
    x_SV = logits_SV.astype(jnp.float32)
    seen_SV = adjust.in_prompt_SV | (adjust.counts_SV > 0)
    rep_S1 = adjust.repetition_S[:, None]
    x_SV = jnp.where(seen_SV, jnp.where(x_SV > 0, x_SV / rep_S1, x_SV * rep_S1), x_SV)
    x_SV = (x_SV - adjust.frequency_S[:, None] * adjust.counts_SV
            - adjust.presence_S[:, None] * (adjust.counts_SV > 0))
    return x_SV + adjust.bias_SV


def sampling_rows(params: Sequence[SamplingParams], request_index: Sequence[int], sample_index: Sequence[int],
                  token_index: Sequence[int], num_rows: int) -> SamplingRows:
    """Host-side SamplingRows for the given rows, padded (greedy) to `num_rows`."""
    if len(params) > num_rows:
        raise ValueError(f"{len(params)} rows do not fit in num_rows={num_rows}")

    def column(values, dtype, pad):
        out = np.full(num_rows, pad, dtype)
        out[:len(values)] = values
        return out

    return SamplingRows(
        temperature_S=column([p.temperature for p in params], np.float32, 0.0),
        top_k_S=column([p.top_k for p in params], np.int32, 0),
        top_p_S=column([p.top_p for p in params], np.float32, 1.0),
        seed_S=column([p.seed for p in params], np.uint32, 0),
        request_S=column(request_index, np.int32, 0),
        sample_index_S=column(sample_index, np.int32, 0),
        token_index_S=column(token_index, np.int32, 0),
        num_logprobs_S=column([p.logprobs for p in params], np.int32, 0),
    )


CANDIDATES = 256  # top-k/top-p thresholds are searched among each row's largest logits first


def process_logits(logits_SV: jax.Array, temperature_S: jax.Array, top_k_S: jax.Array,
                   top_p_S: jax.Array) -> jax.Array:
    """Processed logits (float32): divide by temperature (rows with 0 are left unscaled), keep
    the top_k largest (ties at the k-th value kept), then keep the smallest head of the sorted
    distribution whose mass reaches top_p (ties at the boundary kept). Removed entries are −inf.

    Sorting a [S, V] array is slow on CPU, so the thresholds are found among each row's
    `CANDIDATES` largest logits (`lax.top_k`) whenever every row's k-th value and nucleus lie
    there; otherwise the whole rows are sorted. Passes where no row filters skip both.
    """
    V = logits_SV.shape[-1]
    t_S = jnp.where(temperature_S > 0, temperature_S, 1.0).astype(jnp.float32)
    x_SV = logits_SV.astype(jnp.float32) / t_S[:, None]
    k_S = jnp.where((top_k_S > 0) & (top_k_S < V), top_k_S, 0)  # 0: no top-k filter
    filtering = jnp.any(k_S > 0) | jnp.any(top_p_S < 1.0)

    def thresholds(sorted_SA, full):
        """(cut = max(k-th value, nucleus threshold), whether both lie among the given largest
        values (`full`: they are the whole sorted rows))."""
        A = sorted_SA.shape[-1]
        kth_S = jnp.where(k_S > 0, jnp.take_along_axis(sorted_SA, jnp.clip(k_S - 1, 0, A - 1)[:, None], -1)[:, 0],
                          -jnp.inf)
        kept_SV = x_SV >= kth_S[:, None]
        top_S = jnp.max(x_SV, axis=-1)
        total_S = jnp.sum(jnp.where(kept_SV, jnp.exp(x_SV - top_S[:, None]), 0.0), axis=-1)
        probs_SA = jnp.where(sorted_SA >= kth_S[:, None], jnp.exp(sorted_SA - top_S[:, None]), 0.0) / total_S[:, None]
        cum_SA = jnp.cumsum(probs_SA, axis=-1)
        first_reaching_S = jnp.sum(cum_SA < top_p_S[:, None], axis=-1)
        nucleus_S = jnp.take_along_axis(sorted_SA, jnp.minimum(first_reaching_S, A - 1)[:, None], -1)[:, 0]
        nucleus_S = jnp.where(top_p_S < 1.0, nucleus_S, -jnp.inf)
        found = full or jnp.all((k_S <= A) & ((top_p_S >= 1.0) | (first_reaching_S < A)))
        return jnp.maximum(kth_S, nucleus_S), found

    def filtered(x_SV):
        cut_S, found = thresholds(jax.lax.top_k(x_SV, min(V, CANDIDATES))[0], CANDIDATES >= V)
        cut_S = jax.lax.cond(found, lambda: cut_S,
                             lambda: thresholds(jnp.flip(jnp.sort(x_SV, axis=-1), axis=-1), True)[0])
        return jnp.where(x_SV >= cut_S[:, None], x_SV, -jnp.inf)

    return jax.lax.cond(filtering, filtered, lambda x_SV: x_SV, x_SV)


def row_keys(rows: SamplingRows) -> jax.Array:
    """Typed PRNG key per row: key(seed) folded with request, sample and token index."""
    def one(seed, request, sample_index, token_index):
        key = jax.random.fold_in(jax.random.key(seed), request)
        return jax.random.fold_in(jax.random.fold_in(key, sample_index), token_index)

    return jax.vmap(one)(rows.seed_S, rows.request_S, rows.sample_index_S, rows.token_index_S)


def _draw(processed_SV: jax.Array, rows: SamplingRows) -> jax.Array:
    """One token per row from softmax(processed) by inverting its CDF at one uniform per row
    (one random number per row instead of one per vocabulary entry)."""
    u_S = jax.vmap(jax.random.uniform)(row_keys(rows))
    p_SV = jnp.exp(processed_SV - jnp.max(processed_SV, axis=-1, keepdims=True))
    cum_SV = jnp.cumsum(p_SV, axis=-1)
    target_S = u_S * cum_SV[:, -1]
    return jnp.minimum(jnp.sum(cum_SV <= target_S[:, None], axis=-1), processed_SV.shape[-1] - 1)


def argmax_last(x_SV: jax.Array) -> jax.Array:
    """First index of each row's maximum (= jnp.argmax(x, -1) for finite x); max + masked min
    is several times faster on CPU than XLA's index-carrying argmax reduction."""
    V = x_SV.shape[-1]
    top_S1 = jnp.max(x_SV, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(x_SV == top_S1, jnp.arange(V, dtype=jnp.int32), V), axis=-1), V - 1)


def sample(logits_SV: jax.Array, rows: SamplingRows, adjust: LogitAdjust | None = None
           ) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row; jittable. Returns (tokens_S int32, logprobs_S float32).

    logprobs_S is the log-probability of the sampled token under the processed distribution
    (`adjust_logits`, then `process_logits`). Greedy rows (temperature 0) take the argmax of the
    adjusted logits and report its log-softmax under them (the argmax survives any top-k/top-p
    filter; the point-mass log-prob 0 would carry no information). Passes with only greedy rows
    draw nothing.
    """
    tokens_S, logprobs_S, _, _ = sample_with_top_logprobs(logits_SV, rows, adjust)
    return tokens_S, logprobs_S


def sample_with_top_logprobs(logits_SV: jax.Array, rows: SamplingRows, adjust: LogitAdjust | None = None):
    """`sample`, plus the MAX_LOGPROBS most likely tokens of each row's distribution (the one its
    logprob is reported under) and their log-probabilities: (tokens_S, logprobs_S, top_ids_SK,
    top_logprobs_SK). The top-k search runs only in passes where a row asks for `logprobs`."""
    raw_SV = logits_SV.astype(jnp.float32) if adjust is None else adjust_logits(logits_SV, adjust)
    processed_SV = process_logits(raw_SV, rows.temperature_S, rows.top_k_S, rows.top_p_S)
    greedy_S = rows.temperature_S == 0
    drawn_S = jax.lax.cond(jnp.all(greedy_S), lambda: jnp.zeros(greedy_S.shape, jnp.int32),
                           lambda: _draw(processed_SV, rows).astype(jnp.int32))
    tokens_S = jnp.where(greedy_S, argmax_last(raw_SV), drawn_S).astype(jnp.int32)
    x_SV = jnp.where(greedy_S[:, None], raw_SV, processed_SV)
    norm_S = jax.nn.logsumexp(x_SV, axis=-1)
    chosen_S = jnp.take_along_axis(x_SV, tokens_S[:, None], axis=-1)[:, 0]
    K = min(MAX_LOGPROBS, x_SV.shape[-1])

    def top():
        values_SK, ids_SK = jax.lax.top_k(x_SV, K)
        return ids_SK.astype(jnp.int32), values_SK - norm_S[:, None]

    top_ids_SK, top_logprobs_SK = jax.lax.cond(
        jnp.any(rows.num_logprobs_S > 0), top,
        lambda: (jnp.zeros((x_SV.shape[0], K), jnp.int32), jnp.full((x_SV.shape[0], K), -jnp.inf)))
    return tokens_S, chosen_S - norm_S, top_ids_SK, top_logprobs_SK


# ---- LogitsFn transforms -------------------------------------------------------------------------
def map_logits(fn: LogitsFn, f: Callable[[jax.Array], jax.Array]) -> LogitsFn:
    """LogitsFn whose logits are `f(logits_SV)` of `fn`'s; the cache passes through."""
    def mapped(params, tokens_T, positions_T, cache):
        logits_SV, cache = fn(params, tokens_T, positions_T, cache)
        return f(logits_SV), cache

    return mapped


def suppress_tokens(fn: LogitsFn, token_ids: Sequence[int]) -> LogitsFn:
    """LogitsFn that never emits `token_ids` (their logits set to −inf)."""
    ids = np.asarray(token_ids, np.int64)
    if ids.ndim != 1 or (ids < 0).any():
        raise ValueError(f"token_ids must be a list of non-negative ids, got {token_ids!r}")
    return map_logits(fn, lambda logits_SV: logits_SV.at[:, ids].set(-jnp.inf))


class ProxyTriple(NamedTuple):
    """One value per proxy-tuning member: params, caches, or token streams (a pytree)."""
    base: Any
    expert: Any
    anti: Any


def combine_proxy_logits(base_SV: jax.Array, expert_SV: jax.Array, anti_SV: jax.Array, alpha: float = 1.0, *,
                         vocab_size: int | None = None) -> jax.Array:
    """base + α·(expert − anti) in float32.

    Members must share one vocabulary size, or, with `vocab_size`, are each sliced to their first
    `vocab_size` entries (e.g. CodeLlama's 32,016 vs Llama-2's 32,000 ids, extras at the end).
    """
    sizes = (base_SV.shape[-1], expert_SV.shape[-1], anti_SV.shape[-1])
    if vocab_size is None:
        if len(set(sizes)) != 1:
            raise ValueError(f"proxy members have different vocabulary sizes (base, expert, anti) = {sizes}; "
                             "pass vocab_size to use their shared leading ids")
        vocab_size = sizes[0]
    elif min(sizes) < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} exceeds a member's vocabulary (base, expert, anti) = {sizes}")

    def head(x):
        return x[..., :vocab_size].astype(jnp.float32)

    return head(base_SV) + alpha * (head(expert_SV) - head(anti_SV))


def check_alpha(alpha) -> None:
    """ValueError unless the proxy-tuning weight `alpha` is a finite number."""
    if not isinstance(alpha, (int, float, np.floating, np.integer)) or not math.isfinite(alpha):
        raise ValueError(f"proxy-tuning alpha must be a finite number, got {alpha!r}")


def proxy_tuned(base: LogitsFn, expert: LogitsFn, anti: LogitsFn, alpha: float = 1.0, *,
                vocab_size: int | None = None) -> LogitsFn:
    """Proxy-tuning ensemble as one LogitsFn: logits = base + α·(expert − anti).

    The returned fn takes `params` and `cache` as `ProxyTriple`s (each member keeps its own params
    and cache). `tokens_T` and `positions_T` are either one array fed to all members or a
    `ProxyTriple` of per-member streams, so each member can see its own prompt (e.g. the expert's
    chat template) as long as every member yields one logits row per sequence slot, in the same
    order. Returns (combined logits_SV, ProxyTriple of the members' new caches). ValueError when
    `alpha` is not a finite number.
    """
    check_alpha(alpha)
    members = ProxyTriple(base, expert, anti)

    def per_member(x):
        return x if isinstance(x, ProxyTriple) else ProxyTriple(x, x, x)

    def logits_fn(params, tokens_T, positions_T, cache):
        outs = [fn(p, t, x, c) for fn, p, t, x, c in
                zip(members, params, per_member(tokens_T), per_member(positions_T), cache)]
        logits_SV = combine_proxy_logits(*(logits for logits, _ in outs), alpha, vocab_size=vocab_size)
        return logits_SV, ProxyTriple(*(c for _, c in outs))

    return logits_fn
