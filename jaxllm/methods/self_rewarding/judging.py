"""LLM-as-a-Judge of Self-Rewarding Language Models (arXiv 2401.10020, §2.3 and Figure 2).

The judge prompt is a template file shipped with the package (`templates/`): "paper" is the
additive five-point rubric transcribed from the paper's Figure 2; "toy" is the short rubric of
the toy task (`jaxllm.data.tasks.instructions`), whose model cannot afford the paper's 1,700
characters. A template has one `{prompt}` and one `{response}` field; `render` fills them in one
pass, so braces or field names inside the user's text are inserted literally, never expanded.
The rendered text is the user turn of the tokenizer's chat template.

`parse_score` reads only the *generated* judgement (the prompt contains the format line itself)
and takes the last "Score:" label, unlike Oxen-AI/Self-Rewarding-Language-Models
(`scripts/03_gen_scores.py`: first match over prompt + output) and
lucidrains/self-rewarding-lm-pytorch (`create_parse_reward_fn`: newlines required around it).
`judge` samples `num_samples` judgements per (prompt, response) through the one sampler,
`jaxllm.serve.Engine` (T 0.7, top-p 0.9 as the paper), and averages the valid scores.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams

TEMPLATES = {"paper": "self_rewarding_judge.txt", "toy": "self_rewarding_judge_toy.txt"}
FIELDS = ("prompt", "response")
MAX_SCORE = 5.0
_FIELD_RE = re.compile(r"\{(prompt|response)\}")
_LABEL_RE = re.compile(r"\bscore(?:\*\*)?\s*:", re.IGNORECASE)
_VALUE_RE = re.compile(r"\s*(?:\*\*)?\s*(\d+(?:\.\d+)?)")


def load_template(name_or_path: str | os.PathLike) -> str:
    """The text of a shipped template ("paper", "toy") or of a template file, checked."""
    if str(name_or_path) in TEMPLATES:
        resource = importlib.resources.files("jaxllm") / "methods" / "templates" / TEMPLATES[str(name_or_path)]
        text = resource.read_text(encoding="utf-8")
    else:
        path = pathlib.Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"judge template {name_or_path!r} is neither one of {sorted(TEMPLATES)} nor a file")
        text = path.read_text(encoding="utf-8")
    check_template(text)
    return text


def check_template(template: str) -> None:
    """ValueError unless `template` has each of `{prompt}` and `{response}` exactly once."""
    for field in FIELDS:
        count = template.count("{" + field + "}")
        if count != 1:
            raise ValueError(f"judge template must contain the field {{{field}}} exactly once, found it {count} "
                             f"times in {template[:80]!r}...")


def render(template: str, prompt: str, response: str) -> str:
    """The judge prompt text: `template` with its fields replaced in a single pass (values verbatim)."""
    check_template(template)
    values = {"prompt": prompt, "response": response}
    return _FIELD_RE.sub(lambda m: values[m.group(1)], template)


def judge_prompt_ids(tokenizer, template: str, prompt: str, response: str) -> list[int]:
    """Token ids of the rendered judge prompt as a user turn of `tokenizer`'s chat template, ending
    with the assistant header so the model continues with its judgement."""
    ids, _ = tokenizer.apply_chat([{"role": "user", "content": render(template, prompt, response)}],
                                  add_generation_prompt=True)
    return ids


def parse_score(generated: str) -> float | None:
    """The score of a judgement: the value after the *last* "Score:" label (any case; markdown
    bold around label or value allowed; decimals; a trailing "/5" or "." ignored). None when there
    is no label, its value is not a number, or the number lies outside [0, 5]. Pass the generated
    text only, never the prompt."""
    labels = list(_LABEL_RE.finditer(generated))
    if not labels:
        return None
    match = _VALUE_RE.match(generated, labels[-1].end())
    if match is None:
        return None
    value = float(match.group(1))
    return value if 0.0 <= value <= MAX_SCORE else None


def mean_valid(scores_NK) -> np.ndarray:
    """Row means over the finite entries of `scores_NK` (NaN = invalid judgement); NaN for a row
    with none."""
    scores_NK = np.asarray(scores_NK, np.float64)
    valid_NK = np.isfinite(scores_NK)
    count_N = valid_NK.sum(axis=1)
    total_N = np.where(valid_NK, scores_NK, 0.0).sum(axis=1)
    return np.where(count_N > 0, total_N / np.maximum(count_N, 1), np.nan)


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """How the model judges: the template text (`load_template`), samples averaged per
    (prompt, response), their decoding settings (the paper: 3 samples, T 0.7, top-p 0.9) and the
    judgement length (a ≤100-word justification then the score line)."""

    template: str
    num_samples: int = 3
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256

    def __post_init__(self):
        check_template(self.template)
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_samples {self.num_samples} and max_new_tokens {self.max_new_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Judgements:
    """`scores` [N]: mean valid score per (prompt, response), NaN when no sample parsed;
    `sample_scores` [N, K] (NaN = unparseable); `texts[n][k]` the generated judgements."""

    scores: np.ndarray
    sample_scores: np.ndarray
    texts: list[list[str]]

    @property
    def parse_failure_rate(self) -> float:
        return float(np.mean(~np.isfinite(self.sample_scores))) if self.sample_scores.size else math.nan


def check_context(engine: Engine, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int, what: str) -> None:
    """ValueError naming the first prompt whose tokens + `max_new_tokens` exceed the engine's context."""
    limit = engine.cfg.max_model_len
    for i, ids in enumerate(prompts_ids):
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ValueError(f"{what} {i} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} it exceeds "
                             f"the engine's context of {limit} tokens")


def run_requests(engine: Engine, prompts_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list]:
    """Completions per prompt (key = prompt index, so results depend only on the seed). The first
    request runs alone, so its blocks are in the prefix cache before the rest share them."""
    if not prompts_ids:
        return []
    first = engine.add_request(list(prompts_ids[0]), sampling, key=0)
    while not engine.is_finished(first):
        engine.step()
    ids = [first] + [engine.add_request(list(p), sampling, key=i) for i, p in enumerate(prompts_ids) if i > 0]
    while not all(engine.is_finished(i) for i in ids):
        engine.step()
    return [engine.completions(i) for i in ids]


def judge(engine: Engine, tokenizer, items: Sequence[tuple[str, str]], cfg: JudgeConfig, *, seed: int) -> Judgements:
    """Judge every (prompt, response) of `items` with the engine's current params: `cfg.num_samples`
    sampled judgements each, parsed by `parse_score`, averaged over the valid ones. Deterministic
    for a fixed `seed` (each request's random stream depends only on seed and item index)."""
    prompts_ids = [judge_prompt_ids(tokenizer, cfg.template, p, r) for p, r in items]
    check_context(engine, prompts_ids, cfg.max_new_tokens, "judge prompt")
    sampling = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop_tokens=(tokenizer.eos_id,), seed=seed, n=cfg.num_samples)
    texts = [[tokenizer.decode(c.tokens) for c in completions] for completions in run_requests(engine, prompts_ids, sampling)]
    sample_scores = np.asarray([[np.nan if (s := parse_score(t)) is None else s for t in row] for row in texts],
                               np.float64).reshape(len(items), cfg.num_samples)
    return Judgements(scores=mean_valid(sample_scores), sample_scores=sample_scores, texts=texts)
