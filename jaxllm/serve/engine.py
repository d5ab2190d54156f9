"""The inference engine: a host scheduler feeding one jitted step over flat ragged passes.

Per iteration (`Engine.step`): the `Scheduler` plans a pass (which tokens of which sequences,
their block tables and pool slots, padded to a bucket); the jitted device step runs the model's
LogitsFn on it through a `PagedKVCache` (K/V scattered into the pool, paged attention, LM head on
one row per sequence) and samples every row with its own settings; the sampled tokens come back
to the host, where the scheduler appends them, finishes sequences and frees their blocks.

The model is a `LlamaConfig` (the engine runs `Llama` itself) or any `LogitsFn`
`(params, tokens_T, positions_T, cache) -> (logits_SV, cache)` together with the `KVSpec` of its
cache: one spec, or a pytree of specs for an ensemble whose members each keep their own pool
(e.g. `ProxyTriple` for proxy-tuning, see `jaxllm.methods.proxy_tuning`). Ensemble members may
see different prompts: a request then gives one token list per member. The scheduler sees one
sequence of the longest prompt's length; a member with a shorter prompt is left-aligned to its end
(`PagedKVCache.offset_S`), so every member reaches its last prompt token in the same pass and
sampled tokens are appended to all of them at once.

Request lifecycle: `abort` drops a request at once (blocks freed); samples of one request are
forked from one prefill (see `jaxllm.serve.scheduler`); with a `tokenizer` the engine also keeps
each sample's text, ends samples at `stop` strings and hands out text deltas in its events.
`prompt_logprobs` scores a prompt (for OpenAI's `echo`). A request whose host-side bookkeeping
raises in a step is aborted alone and reported by `take_failures`.

The step is jitted with static shapes (token bucket × context bucket), so it compiles once per
bucket pair that occurs (`precompile` compiles them all up front); `num_compiles` counts the traces.
The host needs each pass's tokens before planning the next, so every step waits for the device:
on CPU, `jax.config.update("jax_cpu_enable_async_dispatch", False)` (set by `launch/serve.py`)
runs the step on the calling thread and saves a thread hand-off per step.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceABC

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model.llama import Llama, LlamaConfig
from jaxllm.serve import sharding
from jaxllm.serve.cache import KVSpec, RaggedBatch, copy_blocks, init_kv_pool
from jaxllm.serve.detokenize import IncrementalText
from jaxllm.serve.outputs import Completion, TokenEvent
from jaxllm.serve.paged_attention import AttentionFn, commit, paged_attention
from jaxllm.serve.sampling import LogitsFn, SamplingParams, sampling_rows
from jaxllm.serve.scheduler import Scheduler, SchedulerConfig
from jaxllm.serve.sequence import StepPlan, check_prompt
from jaxllm.serve.step import default_buckets, default_context_buckets, device_step, llama_logits_fn


@dataclasses.dataclass(frozen=True)
class _Streams:
    """Per-member prompts of an ensemble request, left-padded (−1) to the longest: [M, L]."""
    tokens_ML: np.ndarray
    offsets_M: np.ndarray


@dataclasses.dataclass
class _Output:
    """Engine-side state of one sample: its text (with a tokenizer) and top log-probs so far."""
    text: IncrementalText | None
    top_logprobs: list = dataclasses.field(default_factory=list)


class Engine:
    """Continuous-batching inference over a paged KV cache.

    Offline: `generate(prompts, sampling) -> list[Completion]`. Online: `add_request(...)` returns a
    request id; each `step()` runs one pass and returns its `TokenEvent`s; `completions(id)` hands
    over a finished request; `abort(id)` drops an unfinished one. `tokenizer` (anything with
    `decode(ids) -> str`) enables text and `stop` strings. Weights can be swapped between runs
    with `set_params` (which also drops the prefix cache, whose K/V belong to the old weights).

    `mesh`: shard a `LlamaConfig` model's weights and KV pool over the mesh's `tensor` axis
    (`jaxllm.serve.sharding`; kv heads fewer than the shards are repeated, one per shard); the step
    runs under it. `set_params` takes the model's own params either way.
    """

    def __init__(self, model: LlamaConfig | LogitsFn, params, *, token_budget: int = 256, block_size: int = 16,
                 num_blocks: int = 1024, max_seqs: int = 64, policy: str = "splitfuse", reserve: str = "prompt",
                 buckets: SequenceABC[int] | None = None, context_buckets: SequenceABC[int] | None = None,
                 prefix_caching: bool = True, max_model_len: int | None = None, kv_spec=None,
                 vocab_size: int | None = None, attention: AttentionFn = paged_attention, tokenizer=None,
                 mesh: jax.sharding.Mesh | None = None):
        if mesh is not None and isinstance(model, LlamaConfig):
            sharding.check_mesh(model, mesh)
            self._given_cfg, model = model, sharding.serving_config(model, mesh)  # kv heads repeated
        if isinstance(model, LlamaConfig):
            if kv_spec is not None or vocab_size is not None:
                raise ValueError("kv_spec and vocab_size come from the LlamaConfig; pass them only with a LogitsFn")
            logits_fn, kv_spec, vocab_size = llama_logits_fn(model), KVSpec.of(model), model.vocab_size
            self._score_fn = jax.jit(lambda params, tokens_1T: Llama(model).apply({"params": params}, tokens_1T))
            max_model_len = max_model_len or model.max_len
        elif callable(model):
            if kv_spec is None or vocab_size is None:
                raise ValueError("a LogitsFn model needs kv_spec (KVSpec or a pytree of them) and vocab_size")
            logits_fn, self._score_fn = model, None
        else:
            raise ValueError(f"model must be a LlamaConfig or a LogitsFn, got {type(model).__name__}")
        if mesh is not None and not isinstance(model, LlamaConfig):
            raise ValueError("an engine on a mesh needs the model as a LlamaConfig (its axis names say how to shard it)")
        self.mesh, self._model_cfg = mesh, model
        specs, self._treedef = jax.tree.flatten(kv_spec)
        bad = [s for s in specs if not isinstance(s, KVSpec)]
        if bad or not specs:
            raise ValueError(f"kv_spec leaves must be KVSpec, got {bad[:1] or kv_spec!r}")
        if len(specs) > 1 and prefix_caching and vocab_size + (vocab_size + 1) ** len(specs) >= 2**63:
            raise ValueError(f"prefix-cache ids of {len(specs)} prompt streams over {vocab_size} tokens overflow "
                             "int64; pass prefix_caching=False")
        self.vocab_size = vocab_size
        self.cfg = SchedulerConfig(
            num_blocks=num_blocks, policy=policy, token_budget=token_budget, max_seqs=max_seqs,
            block_size=block_size, reserve=reserve, buckets=tuple(buckets or default_buckets(token_budget)),
            prefix_caching=prefix_caching, max_model_len=max_model_len, vocab_size=vocab_size,
            context_buckets=tuple(default_context_buckets(max_model_len) if context_buckets is None
                                  else context_buckets))
        self.scheduler = Scheduler(self.cfg)
        self.params = self._place(params)
        self._logits_fn, self._attention = logits_fn, attention
        self._pools = tuple(init_kv_pool(s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim,
                                         jnp.dtype(s.dtype)) for s in specs)
        pinned = {}
        if mesh is not None:
            self._pools = jax.device_put(self._pools, (sharding.pool_sharding(model, mesh),))
            pinned = dict(out_shardings=(sharding.pool_sharding(model, mesh),))
        self._context = sharding.step_context(model, mesh)
        self._step_fn = jax.jit(self._device_step)
        self._commit_fn = jax.jit(lambda pools, pending, slots: tuple(map(commit, pools, pending, slots)),
                                  donate_argnums=(0,), **pinned)
        self._copy_fn = jax.jit(lambda pools, src, dst: tuple(copy_blocks(p, src, dst) for p in pools),
                                donate_argnums=(0,), **pinned)
        self.tokenizer = tokenizer
        self._outputs: dict[int, _Output] = {}  # per sequence id
        self._seqs: dict[int, list] = {}  # request id -> its Sequences (for text state and abort)
        self._failures: dict[int, Exception] = {}
        self._num_traces = 0
        self._next_request_id = 0
        self._streams: dict[int, _Streams] = {}
        self._samples_left: dict[int, int] = {}
        self._finished_samples: dict[int, list[Completion]] = {}
        self._finished: dict[int, list[Completion]] = {}

    # ---- requests ------------------------------------------------------------------------------
    @property
    def num_streams(self) -> int:
        """Token streams per request: 1, or the number of ensemble members with their own cache."""
        return len(self._pools)

    @property
    def num_compiles(self) -> int:
        """Distinct shapes the device step was traced (= compiled) for."""
        return self._num_traces

    def add_request(self, prompt, sampling: SamplingParams, *, key: int = 0) -> int:
        """Queue a request; returns its id. `prompt`: token ids, or (ensemble) a tuple with one
        token list per member. Its samples' random streams depend only on (sampling.seed, key,
        sample index, token index). A bad request raises ValueError and changes nothing."""
        request = self._prepare(self._next_request_id, prompt, sampling)
        return self._submit(request, sampling, key)

    def generate(self, prompts: SequenceABC, sampling: SamplingParams | SequenceABC[SamplingParams]) -> list[Completion]:
        """Complete every prompt (ordered by prompt, then sample). Prompt i uses key i. Every
        request is validated before any is queued: a bad one raises ValueError naming its index
        and leaves the engine as it was."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        elif len(sampling) != len(prompts):
            raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
        requests = [self._prepare(i, p, s) for i, (p, s) in enumerate(zip(prompts, sampling))]
        ids = [self._submit(r, s, key=i) for i, (r, s) in enumerate(zip(requests, sampling))]
        while any(i not in self._finished for i in ids):
            self.step()
        return [c for i in ids for c in self.completions(i)]

    def completions(self, request_id: int) -> list[Completion]:
        """The samples of a finished request (handed over once); ValueError if not finished."""
        if request_id not in self._finished:
            raise ValueError(f"request {request_id} is not finished (or was already collected)")
        return self._finished.pop(request_id)

    def is_finished(self, request_id: int) -> bool:
        """Whether every sample of the request finished (and `completions` was not yet called)."""
        return request_id in self._finished

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt blocks (their K/V came from the current weights)."""
        self.scheduler.reset_prefix_cache()

    def set_params(self, params) -> None:
        """Swap the weights (e.g. after an RL update); only between runs, when nothing is in flight."""
        if self.has_unfinished():
            raise ValueError("cannot change params while requests are in flight")
        self.reset_prefix_cache()
        self.params = self._place(params)

    def _place(self, params):
        if self.mesh is None:
            return params
        params = sharding.repeat_kv_heads(params, self._given_cfg, self._model_cfg)
        return sharding.shard_params(self._model_cfg, params, self.mesh)

    def _prepare(self, label, prompt, sampling):
        """Validated (scheduler tokens, prompt_key, streams) of one request; raises ValueError.

        `prompt` is one token list, or a tuple with one list per ensemble member (the same list
        for every member is the one-list case)."""
        if sampling.stop and self.tokenizer is None:
            raise ValueError(f"request {label}: stop strings {sampling.stop!r} need an Engine with a tokenizer")
        bad = [t for t, _ in sampling.logit_bias if t >= self.vocab_size]
        if bad:
            raise ValueError(f"request {label}: logit_bias token id {bad[0]} is outside the vocabulary "
                             f"(size {self.vocab_size})")
        if isinstance(prompt, tuple) and prompt and not isinstance(prompt[0], (int, np.integer)):
            if len(prompt) != self.num_streams:
                raise ValueError(f"request {label}: {len(prompt)} prompt streams for a model with "
                                 f"{self.num_streams}")
            streams = [list(s) for s in prompt]
            for m, s in enumerate(streams):
                check_prompt(f"{label} (stream {m})", s, self.vocab_size)
        else:
            streams = [list(prompt)]
        if all(s == streams[0] for s in streams):
            self.scheduler.check(label, streams[0], sampling)
            return streams[0], None, None
        lengths = [len(s) for s in streams]
        L, V = max(lengths), self.vocab_size
        tokens_ML = np.full((len(streams), L), -1, np.int64)
        for m, s in enumerate(streams):
            tokens_ML[m, L - len(s):] = s
        # Prefix-cache ids naming every member's token at each position (all >= V, so never equal
        # to a generated token): V + sum_m (token_m + 1) (V + 1)^m, exact in int64 (checked at init).
        prompt_key = (V + sum((tokens_ML[m] + 1) * (V + 1) ** m for m in range(len(streams)))).tolist()
        tokens = [0] * L
        self.scheduler.check(label, tokens, sampling)
        return tokens, prompt_key, _Streams(tokens_ML, np.asarray([L - n for n in lengths], np.int32))

    def _submit(self, request, sampling: SamplingParams, key: int) -> int:
        tokens, prompt_key, streams = request
        request_id = self._next_request_id
        self._next_request_id += 1
        seqs = self.scheduler.add(request_id, tokens, sampling, key=key, prompt_key=prompt_key)
        if streams is not None:
            self._streams[request_id] = streams
        self._samples_left[request_id] = sampling.num_samples
        self._seqs[request_id] = seqs
        for seq in seqs:
            text = None if self.tokenizer is None else IncrementalText(self.tokenizer.decode, sampling.stop)
            self._outputs[seq.seq_id] = _Output(text)
        return request_id

    def abort(self, request_id: int) -> bool:
        """Drop an unfinished request now, waiting or running: its blocks return to the pool
        (prefix-cached ones stay cached) and it yields no more events or completions. False (and
        nothing changes) for an unknown, finished or already aborted request."""
        if request_id not in self._samples_left:
            return False
        self.scheduler.abort(request_id)
        for seq in self._seqs.pop(request_id):
            self._outputs.pop(seq.seq_id, None)
        del self._samples_left[request_id]
        self._finished_samples.pop(request_id, None)
        self._streams.pop(request_id, None)
        return True

    def prompt_logprobs(self, prompt: SequenceABC[int], num_top: int = 0) -> list[tuple[float, tuple]]:
        """For prompt tokens 1.., the log-probability of each under the model given the tokens
        before it, and the `num_top` most likely alternatives ((token, logprob), best first): the
        raw model distribution, as OpenAI's `echo` reports it. One dense forward pass (length
        padded to a power of two, so few compiles); needs a LlamaConfig model."""
        if self._score_fn is None:
            raise ValueError("prompt_logprobs needs an Engine built from a LlamaConfig")
        check_prompt("prompt_logprobs", list(prompt), self.vocab_size)
        L = len(prompt)
        T = max(16, 1 << (L - 1).bit_length())
        tokens_1T = np.zeros((1, T), np.int32)
        tokens_1T[0, :L] = prompt
        logp_TV = np.asarray(jax.nn.log_softmax(self._score_fn(self.params, tokens_1T)[0, :L - 1].astype(jnp.float32)))
        out = []
        for i in range(1, L):
            row = logp_TV[i - 1]
            top = np.argsort(-row, kind="stable")[:num_top]
            out.append((float(row[prompt[i]]), tuple((int(t), float(row[t])) for t in top)))
        return out

    # ---- passes --------------------------------------------------------------------------------
    def precompile(self) -> int:
        """Compile the device step for every (token bucket, table width) pair now, with all-padding
        passes that change nothing, so no request waits for a compile; returns the pair count."""
        pairs = [(T, W) for T in self.cfg.buckets for W in self.cfg.table_widths]
        for T, W in pairs:
            S = min(self.cfg.max_seqs, T)
            batch = RaggedBatch(np.zeros(T, np.int32), np.zeros(T, np.int32), np.full(T, -1, np.int32),
                                np.full(T, -1, np.int32), np.full((S, W), -1, np.int32), np.zeros(S, np.int32),
                                np.full(S, -1, np.int32), np.zeros(S, bool))
            batches, offsets = (batch,) * self.num_streams, (np.zeros(S, np.int32),) * self.num_streams
            *_, pending = self._step_fn(self.params, self._pools, batches, offsets, sampling_rows([], [], [], [], S),
                                        None)
            self._pools = self._commit_fn(self._pools, pending, tuple(b.slot_mapping_T for b in batches))
        jax.block_until_ready(self._pools)
        return len(pairs)

    def step(self) -> list[TokenEvent]:
        """Run one pass; returns the tokens it produced ([] when nothing is queued)."""
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        batches, offsets = self._stream_batches(plan)
        tokens_S, logprobs_S, top_ids_SK, top_logprobs_SK, pending = self._step_fn(
            self.params, self._pools, batches, offsets, plan.sampling_rows(), plan.logit_adjust(self.vocab_size))
        self._pools = self._commit_fn(self._pools, pending, tuple(b.slot_mapping_T for b in batches))
        tokens_S, logprobs_S = np.asarray(tokens_S), np.asarray(logprobs_S)
        finished = {seq.seq_id for seq in self.scheduler.update(plan, tokens_S, logprobs_S)}
        self._apply_copies(self.scheduler.take_copies())
        if any(seq.params.logprobs for seq in plan.seqs):
            top_ids_SK, top_logprobs_SK = np.asarray(top_ids_SK), np.asarray(top_logprobs_SK)
        events, failed = [], {}
        for s, seq in enumerate(plan.seqs):
            if not plan.batch.sample_S[s] or seq.request_index in failed:
                continue
            top = ()
            if seq.params.logprobs:
                k = seq.params.logprobs
                top = tuple((int(t), float(x)) for t, x in zip(top_ids_SK[s, :k], top_logprobs_SK[s, :k])
                            if np.isfinite(x))
            try:
                events.append(self._event(seq, int(tokens_S[s]), float(logprobs_S[s]), top, seq.seq_id in finished))
            except Exception as err:  # noqa: BLE001 - one request's bookkeeping fails that request alone
                failed[seq.request_index] = err
        for request_id, err in failed.items():
            self.abort(request_id)
            self._failures[request_id] = err
        return [e for e in events if e.request_id not in failed]

    def take_failures(self) -> dict[int, Exception]:
        """Requests whose host-side bookkeeping (e.g. detokenizing) raised in a step since the
        last call, with the error; each was aborted, the other requests went on."""
        failures, self._failures = self._failures, {}
        return failures

    def _event(self, seq, token: int, logprob: float, top: tuple, done: bool) -> TokenEvent:
        """The event of a sampled row: top log-probs and text kept, a stop string ends the sample."""
        out = self._outputs[seq.seq_id]
        if seq.params.logprobs:
            out.top_logprobs.append(top)
        if out.text is not None and out.text.append(token):  # a stop string
            if done:
                seq.finish_reason = "stop"
            else:
                self.scheduler.finish(seq, "stop")
                done = True
        text = "" if out.text is None else out.text.take_delta(final=done)
        event = TokenEvent(seq.request_index, seq.sample_index, token, logprob, seq.finish_reason if done else None,
                           text, top)
        if done:
            self._finish(seq)
        return event

    def _apply_copies(self, copies: list[tuple[int, int]]) -> None:
        """Do the forks' block copies on device (padded to a power of two: few compiles)."""
        if not copies:
            return
        C = 1 << (len(copies) - 1).bit_length()
        src_C = np.zeros(C, np.int32)
        dst_C = np.full(C, self.cfg.num_blocks, np.int32)  # out of range: dropped
        src_C[:len(copies)], dst_C[:len(copies)] = zip(*copies)
        self._pools = self._copy_fn(self._pools, src_C, dst_C)

    def _finish(self, seq) -> None:
        rid = seq.request_index
        out = self._outputs.pop(seq.seq_id)
        done = self._finished_samples.setdefault(rid, [])
        done.append(Completion(rid, seq.sample_index, list(seq.output), list(seq.logprobs), seq.finish_reason,
                               seq.num_cached_tokens, None if out.text is None else out.text.text,
                               tuple(out.top_logprobs)))
        self._samples_left[rid] -= 1
        if not self._samples_left[rid]:
            del self._samples_left[rid], self._finished_samples[rid], self._seqs[rid]
            self._streams.pop(rid, None)
            if len(done) > seq.params.n:  # best_of: keep the n most likely samples, best first
                done = sorted(done, key=lambda c: -sum(c.logprobs))[:seq.params.n]
                done = [dataclasses.replace(c, sample_index=j) for j, c in enumerate(done)]
            self._finished[rid] = sorted(done, key=lambda c: c.sample_index)

    def _stream_batches(self, plan: StepPlan):
        """Each member's view of the pass: its own tokens, positions and written slots for ensemble
        requests with per-member prompts (padding before a shorter prompt is neither written nor
        attended), and the row offsets."""
        batch = plan.batch
        S = len(batch.context_len_S)
        rows = [(s, seq, t, n) for s, (seq, n, t) in
                enumerate(zip(plan.seqs, plan.num_tokens, np.cumsum((0,) + plan.num_tokens[:-1])))
                if seq.request_index in self._streams]
        if not rows:
            zeros_S = np.zeros(S, np.int32)
            return (batch,) * self.num_streams, (zeros_S,) * self.num_streams
        batches, offsets = [], []
        for m in range(self.num_streams):
            tokens_T, positions_T = batch.tokens_T.copy(), batch.positions_T.copy()
            slot_T, slot_mapping_T = batch.slot_T.copy(), batch.slot_mapping_T.copy()
            offset_S = np.zeros(S, np.int32)
            for s, seq, t, n in rows:
                streams = self._streams[seq.request_index]
                prompt_L, d = streams.tokens_ML[m], int(streams.offsets_M[m])
                v = np.arange(seq.num_computed, seq.num_computed + n)
                in_prompt = v < len(prompt_L)
                tok = np.where(in_prompt, prompt_L[np.minimum(v, len(prompt_L) - 1)], tokens_T[t:t + n])
                pad = tok < 0
                tokens_T[t:t + n] = np.where(pad, 0, tok)
                positions_T[t:t + n] = np.maximum(v - d, 0)
                slot_T[t:t + n] = np.where(pad, -1, s)
                slot_mapping_T[t:t + n] = np.where(pad, -1, slot_mapping_T[t:t + n])
                offset_S[s] = d
            batches.append(dataclasses.replace(batch, tokens_T=tokens_T, positions_T=positions_T, slot_T=slot_T,
                                               slot_mapping_T=slot_mapping_T))
            offsets.append(offset_S)
        return tuple(batches), tuple(offsets)

    def _device_step(self, params, pools, batches: tuple[RaggedBatch, ...], offsets, rows, adjust):
        """Jitted: `device_step` of this engine's model, under its mesh when it has one."""
        self._num_traces += 1
        with self._context():
            return device_step(self._logits_fn, self._attention, self._treedef, self.vocab_size, params, pools,
                               batches, offsets, rows, adjust)
