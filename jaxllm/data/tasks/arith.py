"""Multi-step arithmetic word problems: the task of the ReFT mini-reproduction (arXiv 2401.08967).

A problem lists 2–3 *groups* someone has: "3 bags of 4" (a product), "6 loose" (a number) or
"lost 2" (a subtraction; never first), e.g. "ann has 3 bags of 4, 6 loose, lost 2. how many?".
The total needs 2–4 operations, and the products and the terms of the sum can be computed in any
order, so many chains of thought reach the answer; the gold ones always use one canonical order
(products left to right, then the sum left to right):

- N-CoT (natural-language steps): "3*4=12. 12+6=18. 18-2=16.\\ntherefore: 16"
- P-CoT (a program for `sandbox.evaluate`): "a=3*4\\nb=a+6\\nans=b-2"

`extract_answer` (N-CoT) and `run_program` (P-CoT) are the only ways an answer is read, for the
training reward and for evaluation alike. Held-out splits use group-kind combinations that the
training split never shows (`TEST_COMBOS`). `CharTokenizer` maps the task's characters to ids.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from jaxllm.data.tasks.sandbox import SandboxLimits, run_program

TRIGGER = "\ntherefore: "
NAMES = ("ann", "bob", "cal", "dee", "eve", "fay", "gus", "hal")
KINDS = ("bags", "loose", "lost")
# Kind sequences held out of training (new template combinations at test time).
TEST_COMBOS = (("loose", "bags", "lost"), ("bags", "lost", "bags"), ("loose", "lost", "bags"))
STYLES = ("ncot", "pcot")


def _combos() -> list[tuple[str, ...]]:
    out = []
    for n in (2, 3):
        for combo in itertools.product(KINDS, repeat=n):
            ops = combo.count("bags") + n - 1
            if combo[0] != "lost" and 2 <= ops <= 4:
                out.append(combo)
    return out


TRAIN_COMBOS = tuple(c for c in _combos() if c not in TEST_COMBOS)


def _phrase(kind: str, nums: tuple[int, ...]) -> str:
    return {"bags": f"{nums[0]} bags of {nums[-1]}", "loose": f"{nums[0]} loose", "lost": f"lost {nums[0]}"}[kind]


def _cot(groups, style: str) -> tuple[str, int]:
    """Canonical-order gold chain of thought and the answer."""
    steps, values, var = [], [], iter("abcdefgh")
    for kind, nums in groups:
        if kind == "bags":
            v, name = nums[0] * nums[1], next(var)
            steps.append((f"{nums[0]}*{nums[1]}={v}.", f"{name}={nums[0]}*{nums[1]}"))
            values.append((v, name, +1))
        else:
            values.append((nums[0], str(nums[0]), -1 if kind == "lost" else +1))
    total, expr = values[0][0], values[0][1]
    for i, (v, name, sign) in enumerate(values[1:]):
        op = "+" if sign > 0 else "-"
        new = total + sign * v
        out = "ans" if i == len(values) - 2 else next(var)
        steps.append((f"{total}{op}{v}={new}.", f"{out}={expr}{op}{name}"))
        total, expr = new, out
    if style == "ncot":
        return " ".join(s for s, _ in steps) + f"{TRIGGER}{total}", total
    return "\n".join(p for _, p in steps), total


def make_problem(rng: np.random.Generator, combo: tuple[str, ...], style: str = "ncot") -> dict:
    """One problem of the given group kinds: {"question", "cot", "answer"}; numbers 1–9, redrawn
    until the running total never goes below 0."""
    if style not in STYLES:
        raise ValueError(f"unknown CoT style {style!r}; known: {STYLES}")
    while True:
        groups = [(k, (int(rng.integers(2, 10)), int(rng.integers(2, 10))) if k == "bags"
                   else (int(rng.integers(1, 10)),)) for k in combo]
        running, ok = 0, True
        for k, nums in groups:
            running += -nums[0] if k == "lost" else math.prod(nums)
            ok &= running >= 0
        if ok:
            break
    name = NAMES[int(rng.integers(len(NAMES)))]
    question = f"{name} has " + ", ".join(_phrase(k, n) for k, n in groups) + ". how many?"
    cot, answer = _cot(groups, style)
    return {"question": question, "cot": cot, "answer": str(answer)}


def make_split(n: int, seed: int, *, held_out: bool = False, style: str = "ncot",
               exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct problems (train combos, or the held-out `TEST_COMBOS`), none of whose questions
    is in `exclude` (e.g. the training questions, for a validation split with new numbers)."""
    rng = np.random.default_rng(seed)
    combos = TEST_COMBOS if held_out else TRAIN_COMBOS
    out, seen = [], set(exclude)
    for _ in range(100 * n):
        if len(out) == n:
            return out
        p = make_problem(rng, combos[int(rng.integers(len(combos)))], style)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    raise ValueError(f"could not draw {n} distinct problems (got {len(out)}); ask for fewer")


def splits(train: int, val: int, test: int, seed: int, style: str = "ncot") -> dict[str, list[dict]]:
    """{train, val, test}: val has new questions of the training combinations (checkpoint
    selection), test the held-out combinations (reported once)."""
    train_split = make_split(train, seed, style=style)
    return {"train": train_split,
            "val": make_split(val, seed + 1, style=style, exclude=frozenset(p["question"] for p in train_split)),
            "test": make_split(test, seed + 2, style=style, held_out=True)}


def extract_answer(text: str) -> float | None:
    """N-CoT answer: the number after the last TRIGGER (commas stripped), None if absent or not a number."""
    if TRIGGER not in text:
        return None
    tail = text.rsplit(TRIGGER, 1)[1].strip().replace(",", "")
    try:
        value = float(tail)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def program_answer(text: str, limits: SandboxLimits = SandboxLimits()) -> float | None:
    """P-CoT answer: `ans` after running the program in the sandbox, None if refused or failing."""
    return run_program(text, limits)


EXTRACTORS = {"ncot": extract_answer, "pcot": program_answer}


def parse_gold(answer) -> float:
    """A gold answer as a number; ValueError naming it when it does not parse."""
    try:
        value = float(str(answer).replace(",", ""))
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"gold answer {answer!r} is not a finite number")
    return value


def prompt(question: str) -> str:
    """The prompt format of the paper's code: question, then the reasoning cue."""
    return f"Q: {question}\nA: "


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """Character vocabulary of the task: pad 0, bos 1, eos 2, then the characters."""

    chars: str = "".join(sorted(set("abcdefghijklmnopqrstuvwxyzQA0123456789 .,:?*+-=/()\n")))
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 3

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        bad = sorted(set(text) - set(self.chars))
        if bad:
            raise ValueError(f"characters {bad!r} are not in the task vocabulary")
        ids = [self.chars.index(c) + 3 for c in text]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of `ids`, stopping at the first eos; other specials are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= 3:
                out.append(self.chars[i - 3])
        return "".join(out)
