"""Host-side scheduling of ragged passes: Dynamic SplitFuse (arXiv 2401.08671) and baselines.

Every pass holds at most `token_budget` tokens from at most `max_seqs` sequences. A sequence's
K/V lives in the paged pool (`cache.BlockManager`); `num_computed` of its tokens are cached, and a
pass feeds the next chunk of the rest. The last token fed samples the next one.

Policies (same interface, same flat batch):
- `splitfuse`: decodes first (one token each), then prompt tokens up to the budget: prompts
  already in progress first, then waiting prompts in arrival order. Long prompts are split over
  passes (only the final chunk samples), short ones are fused into the same pass.
- `prefill_first`: a pass runs only whole prompts when any waiting prompt can be admitted, pausing
  every decode; otherwise all decodes. Nothing is chunked, so every request must fit the budget.
- `static`: a group of requests is admitted together when nothing is running; its whole prompts
  run in prefill-only passes, then it decodes until every member finishes.

Admission: a prompt starts only when the free pool holds blocks for all its remaining tokens
(prefix-cache hits excluded) plus one block for its first decode when it will need one
(`reserve="prompt"`), or for its whole final length (`reserve="prompt_plus_max_new"`, which never
preempts). When a decode needs a block and none is free, the most recently admitted sequence is
preempted by recompute: its blocks are freed and it returns to the front of the queue with its
generated tokens appended to its prompt, so its outputs are unchanged.

Several samples of one request (`n`, `best_of`) share one prefill: only sample 0 is queued; once
its prompt is computed the others are forked from it (`BlockManager.fork`: full blocks shared
copy-on-write, the partial last block copied on device, see `take_copies`) holding all prompt
tokens but the last, which each feeds as its first decode to get its own logits row. A sample
that cannot be forked (no room in the running set or pool) is queued as a plain sequence.

Static shapes: a pass is padded to the smallest of `buckets` holding its tokens (rows: min(max_seqs,
T)), and its block tables to the smallest of `context_buckets` holding its longest history (tokens
cached before the pass; the pass's own tokens are addressed by `slot_mapping_T`), so the device
step compiles once per (token bucket, context bucket) pair and attention reads no more blocks than
the pass needs: a pass of fresh prompts reads none of the long tables their contexts will need.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence as SequenceABC

import numpy as np

from jaxllm.serve.cache import BlockManager, RaggedBatch
from jaxllm.serve.sampling import SamplingParams
from jaxllm.serve.sequence import Sequence, Status, StepPlan, check_prompt

POLICIES = ("splitfuse", "prefill_first", "static")
RESERVES = ("prompt", "prompt_plus_max_new")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler settings. `buckets` are the padded token counts T a pass may have (one compile
    each); the row count is padded to min(max_seqs, T). `max_model_len` bounds prompt + max_tokens
    and sets the widest block table (default: the whole pool). `context_buckets` (tokens,
    increasing) are the block-table widths a pass may have; the full width is always one of them.
    `vocab_size` enables id checks."""
    num_blocks: int
    policy: str = "splitfuse"
    token_budget: int = 768
    max_seqs: int = 512
    block_size: int = 64
    reserve: str = "prompt"
    buckets: tuple[int, ...] = (64, 128, 256, 512, 768)
    prefix_caching: bool = True
    max_model_len: int | None = None
    context_buckets: tuple[int, ...] = ()
    vocab_size: int | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.reserve not in RESERVES:
            raise ValueError(f"reserve must be one of {RESERVES}, got {self.reserve!r}")
        for name in ("num_blocks", "token_budget", "max_seqs", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_model_len", "vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        buckets = tuple(self.buckets)
        if not buckets or any(b <= a for a, b in zip(buckets, buckets[1:])) or buckets[0] <= 0:
            raise ValueError(f"buckets must be positive and strictly increasing, got {self.buckets!r}")
        if buckets[-1] < self.token_budget:
            raise ValueError(f"largest bucket {buckets[-1]} is below token_budget {self.token_budget}")
        object.__setattr__(self, "buckets", buckets)
        contexts = tuple(self.context_buckets)
        if any(b <= a for a, b in zip(contexts, contexts[1:])) or (contexts and contexts[0] <= 0):
            raise ValueError(f"context_buckets must be positive and strictly increasing, got {self.context_buckets!r}")
        object.__setattr__(self, "context_buckets", contexts)

    @property
    def table_widths(self) -> tuple[int, ...]:
        """Block-table widths a pass may have (blocks), increasing; the last is the full width."""
        full = -(-self.max_model_len // self.block_size) if self.max_model_len else self.num_blocks
        return tuple(sorted({min(-(-c // self.block_size), full) for c in self.context_buckets} | {full}))


class Scheduler:
    """Request queue + block manager; `schedule()` plans a pass, `update()` applies its samples."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, prefix_caching=cfg.prefix_caching)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens fed to the model (prefix-cache hits excluded)
        self._copies: list[tuple[int, int]] = []  # (src, dst) blocks forks still need copied on device
        self._max_running = min(cfg.max_seqs, cfg.token_budget)
        self._group: set[int] = set()  # static policy: ids of the group being served
        self._next_seq_id = 0

    # ---- requests ------------------------------------------------------------------------------
    def add(self, request_index: int, prompt: SequenceABC[int], params: SamplingParams, *, key: int | None = None,
            prompt_key: SequenceABC[int] | None = None) -> list[Sequence]:
        """Validate a request (`check`) and queue its `params.num_samples` samples (sample 0 queued,
        the others forked from it after its prompt); a bad request raises ValueError and leaves the
        scheduler untouched. `key` (default `request_index`) names its random stream; `prompt_key`
        see `Sequence`."""
        tokens = list(prompt)
        self.check(request_index, tokens, params)
        if prompt_key is not None and len(prompt_key) != len(tokens):
            raise ValueError(f"request {request_index}: prompt_key has {len(prompt_key)} ids for {len(tokens)} tokens")
        seqs = []
        key = request_index if key is None else key
        prompt_key = None if prompt_key is None else [int(t) for t in prompt_key]
        for j in range(params.num_samples):
            seqs.append(Sequence(self._next_seq_id, request_index, j, [int(t) for t in tokens], len(tokens), params,
                                 key, prompt_key))
            self._next_seq_id += 1
        seqs[0].forks = seqs[1:]
        self.waiting.append(seqs[0])
        return seqs

    def abort(self, request_index: int) -> list[Sequence]:
        """Remove every unfinished sample of a request, waiting or running (blocks freed at once;
        prefix-cached blocks stay cached). Returns the removed sequences ([] for an unknown or
        finished request)."""
        removed = [seq for seq in self.waiting if seq.request_index == request_index]
        self.waiting = collections.deque(seq for seq in self.waiting if seq.request_index != request_index)
        for seq in [seq for seq in self.running if seq.request_index == request_index]:
            self.blocks.free(seq.seq_id)
            self.running.remove(seq)
            removed.append(seq)
        for seq in list(removed):
            removed += seq.forks
            seq.forks = []
        for seq in removed:
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
        return removed

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running sample now (e.g. a stop string in its text): its blocks return to the pool."""
        if seq.status is Status.FINISHED:
            return
        if seq.forks:
            raise ValueError(f"sequence {seq.seq_id} still has samples to fork")
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.blocks.free(seq.seq_id)
        self.running.remove(seq)

    def take_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block copies of the forks made since the last call; the device must do them
        before the next pass."""
        copies, self._copies = self._copies, []
        return copies

    def check(self, request_index: int | str, tokens: SequenceABC[int], params: SamplingParams) -> None:
        """ValueError naming the request and the offending value unless the request can be served:
        a non-empty prompt of valid ids whose prompt + max_tokens fits max_model_len, the whole KV
        pool, and (for the policies that never chunk) the token budget."""
        cfg = self.cfg
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {request_index}: sampling params must be SamplingParams, got {params!r}")
        check_prompt(request_index, tokens, cfg.vocab_size)
        total = len(tokens) + params.max_tokens
        if cfg.max_model_len is not None and total > cfg.max_model_len:
            raise ValueError(f"request {request_index}: prompt of {len(tokens)} tokens + max_tokens "
                             f"{params.max_tokens} exceeds max_model_len {cfg.max_model_len}")
        kv_blocks = self.blocks.blocks_for(total - 1)
        if kv_blocks > cfg.num_blocks:
            raise ValueError(f"request {request_index}: prompt of {len(tokens)} tokens + max_tokens "
                             f"{params.max_tokens} needs {kv_blocks} KV blocks, the whole cache has {cfg.num_blocks}")
        if cfg.policy != "splitfuse" and total - 1 > cfg.token_budget:
            raise ValueError(f"request {request_index}: policy {cfg.policy!r} does not chunk, so prompt of "
                             f"{len(tokens)} tokens + max_tokens {params.max_tokens} (recomputed after "
                             f"preemption) must fit token_budget {cfg.token_budget}")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def reset_prefix_cache(self) -> None:
        """Drop cached blocks (weights changed); only valid when nothing is running."""
        self.blocks.reset_prefix_cache()

    # ---- planning ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """Plan the next pass; None when no request is left."""
        plan = self._plan_split_fuse if self.cfg.policy == "splitfuse" else self._plan_whole_prompts
        rows = plan()
        if not rows and self.has_unfinished():
            # Everything running was preempted (the pool is now free): admit from the queue.
            rows = plan()
        return self._build_plan(rows) if rows else None

    def _plan_split_fuse(self) -> list[tuple[Sequence, int]]:
        rows: list[tuple[Sequence, int]] = []
        preempted = self._schedule_decodes(rows)
        budget = self.cfg.token_budget - len(rows)
        for seq in [s for s in self.running if s.status is Status.PREFILL]:  # chunks in progress first
            if budget == 0:
                return rows
            n = min(seq.num_tokens - seq.num_computed, budget)
            rows.append((seq, n))
            budget -= n
        while not preempted and budget > 0 and self._admit_head():
            seq = self.running[-1]
            n = min(seq.num_tokens - seq.num_computed, budget)
            rows.append((seq, n))
            budget -= n
        return rows

    def _plan_whole_prompts(self) -> list[tuple[Sequence, int]]:
        static = self.cfg.policy == "static"
        if static:
            self._admit_group()
        rows: list[tuple[Sequence, int]] = []
        budget = self.cfg.token_budget
        for seq in [s for s in self.running if s.status is Status.PREFILL]:
            n = seq.num_tokens - seq.num_computed
            if n > budget:
                break
            rows.append((seq, n))
            budget -= n
        while not static and self.waiting:
            head = self.waiting[0]
            if head.num_tokens - len(self.blocks.cached_prefix(head.cache_ids)) * self.cfg.block_size > budget:
                break
            if not self._admit_head():
                break
            rows.append((head, head.num_tokens - head.num_computed))
            budget -= rows[-1][1]
        if not rows:
            self._schedule_decodes(rows)
        return rows

    def _schedule_decodes(self, rows: list[tuple[Sequence, int]]) -> bool:
        """Append every running decode (admission order), preempting the newest sequence while a
        decode lacks a block. Returns whether anything was preempted."""
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.DECODE:  # prefilling, or preempted earlier in this loop
                continue
            while not self.blocks.append_slots(seq.seq_id, seq.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                rows.append((seq, 1))
        return preempted

    def _admit_head(self) -> bool:
        """Admit the first waiting sequence if the running set and the pool have room for it."""
        if not self.waiting or len(self.running) >= self._max_running:
            return False
        seq, blocks = self.waiting[0], self.blocks
        if self.cfg.reserve == "prompt_plus_max_new":
            num_tokens, extra = seq.max_kv_tokens, 0
        else:
            num_tokens = seq.num_tokens
            extra = int(blocks.blocks_for(seq.max_kv_tokens) > blocks.blocks_for(num_tokens))
        if blocks.blocks_to_allocate(seq.cache_ids, num_tokens) + extra > blocks.num_free_blocks:
            return False
        seq.num_computed = blocks.allocate(seq.seq_id, seq.cache_ids, num_tokens)
        if not seq.num_preemptions:
            seq.num_cached_tokens = seq.num_computed
        seq.status = Status.PREFILL
        self.running.append(self.waiting.popleft())
        return True

    def _admit_group(self) -> None:
        """Static policy: when nothing runs, start a new group from the queue head; otherwise only
        readmit members of the current group (preempted ones wait at the queue front)."""
        if not self.running and self.waiting and self.waiting[0].seq_id not in self._group:
            self._group = set()
            forming = True
        else:
            forming = False
        while self.waiting and (forming or self.waiting[0].seq_id in self._group):
            head = self.waiting[0]
            if not self._admit_head():
                return
            self._group.add(head.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        self.running.remove(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _build_plan(self, rows: list[tuple[Sequence, int]]) -> StepPlan:
        used = sum(n for _, n in rows)
        T = next(b for b in self.cfg.buckets if b >= used)
        S = min(self.cfg.max_seqs, T)
        longest = max(self.blocks.blocks_for(seq.num_computed) for seq, _ in rows)
        W = next(w for w in self.cfg.table_widths if w >= longest)
        tokens_T = np.zeros(T, np.int32)
        positions_T = np.zeros(T, np.int32)
        slot_T = np.full(T, -1, np.int32)
        slot_mapping_T = np.full(T, -1, np.int32)
        block_tables_SW = np.full((S, W), -1, np.int32)
        context_len_S = np.zeros(S, np.int32)
        last_index_S = np.full(S, -1, np.int32)
        sample_S = np.zeros(S, bool)
        t, bs = 0, self.cfg.block_size
        for s, (seq, n) in enumerate(rows):
            start, stop = seq.num_computed, seq.num_computed + n
            table = self.blocks.block_table(seq.seq_id)
            if n == 1:  # decodes: plain Python is several times faster than NumPy slices
                tokens_T[t], positions_T[t], slot_T[t] = seq.token_ids[start], start, s
                slot_mapping_T[t] = table[start // bs] * bs + start % bs
            else:
                tokens_T[t:t + n] = seq.token_ids[start:stop]
                positions_T[t:t + n] = np.arange(start, stop)
                slot_T[t:t + n] = s
                slot_mapping_T[t:t + n] = self.blocks.slot_mapping(seq.seq_id, start, stop)
            block_tables_SW[s, :min(len(table), W)] = table[:W]
            context_len_S[s] = stop
            last_index_S[s] = t + n - 1
            sample_S[s] = stop == seq.num_tokens
            t += n
        batch = RaggedBatch(tokens_T, positions_T, slot_T, slot_mapping_T, block_tables_SW, context_len_S,
                            last_index_S, sample_S)
        return StepPlan(tuple(seq for seq, _ in rows), tuple(n for _, n in rows), batch)

    # ---- results -------------------------------------------------------------------------------
    def update(self, plan: StepPlan, tokens_S: np.ndarray, logprobs_S: np.ndarray) -> list[Sequence]:
        """Apply a finished pass: mark its tokens cached, append sampled tokens, finish sequences
        (their blocks return to the pool). Returns the sequences that finished."""
        finished = []
        for s, (seq, n) in enumerate(zip(plan.seqs, plan.num_tokens)):
            self.num_prompt_tokens_computed += max(0, min(seq.num_computed + n, seq.num_prompt_tokens)
                                                   - seq.num_computed)
            seq.num_computed += n
            self.blocks.commit(seq.seq_id, seq.cache_ids, seq.num_computed)
            if not plan.batch.sample_S[s]:
                continue
            if seq.forks:
                self._fork(seq)
            token = int(tokens_S[s])
            seq.token_ids.append(token)
            seq.logprobs.append(float(logprobs_S[s]))
            seq.status = Status.DECODE
            if token in seq.params.stop_tokens:
                seq.finish_reason = "stop"
            elif seq.num_tokens - seq.num_prompt_tokens == seq.params.max_tokens:
                seq.finish_reason = "length"
            else:
                continue
            seq.status = Status.FINISHED
            self.blocks.free(seq.seq_id)
            self.running.remove(seq)
            finished.append(seq)
        return finished

    def _fork(self, parent: Sequence) -> None:
        """Start the pending samples of `parent`, whose prompt is now computed: each shares its
        blocks up to the last prompt token and feeds that token as a decode; one without room in
        the running set or the pool is queued (at the front) as a plain sequence."""
        last, bs = parent.num_prompt_tokens - 1, self.cfg.block_size
        reserving = self.cfg.reserve == "prompt_plus_max_new"
        queued = []
        for child in parent.forks:
            need = self.blocks.blocks_for(child.max_kv_tokens) - last // bs if reserving else int(last % bs > 0)
            if last == 0 or len(self.running) >= self._max_running or need > self.blocks.num_free_blocks:
                queued.append(child)
                continue
            self._copies += self.blocks.fork(parent.seq_id, child.seq_id, last)
            if reserving:
                self.blocks.append_slots(child.seq_id, child.max_kv_tokens)
            child.num_computed, child.status = last, Status.DECODE
            child.num_cached_tokens = parent.num_cached_tokens
            self.running.append(child)
            self._group.add(child.seq_id)
        parent.forks = []
        self.waiting.extendleft(reversed(queued))
