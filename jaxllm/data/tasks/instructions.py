"""Instructions with verifiable answers: the toy task of the Self-Rewarding mini-reproduction
(arXiv 2401.10020 at toy scale; the paper's task is open-ended Open Assistant instructions).

An instruction is an operation and its argument: "rev cabd" → "dbac", "sort cabd" → "abcd",
"up cab" → "CAB", "add 12 7" → "19". Because every instruction has one correct answer, a
ground-truth additive rubric can score *any* response 0–5, one point per criterion, in the
spirit of the paper's additive judge prompt (relevant → partial → answers → concise → ideal):

    1 relevant  the response shares at least one character with the answer
    2 partial   at least half of the answer's characters (as a multiset) appear in it
    3 answer    the answer appears in it
    4 short     it is at most one character longer than the answer
    5 exact     it is the answer and nothing else

The rubric stands in for the paper's human rankings and for AlpacaEval: experiments measure the
model against it, never against the model's own judge. It also writes the EFT targets (a short
justification, the five criterion bits, then "Score: k"), and `perturb` draws responses of every
quality for EFT and for the held-out judge sets. `CharTokenizer` (one id per character, chat
roles as single ids) keeps sequences short enough for a tiny model.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import string
from collections.abc import Mapping, Sequence

import numpy as np

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<system>", "<user>", "<assistant>")
CHARS = string.ascii_letters + string.digits + " \n.,:;!?'\"()[]{}<>+-*/=_#%&|~^@$`\\"
OPS = ("rev", "sort", "up", "add")
NUM_CRITERIA = 5


class CharTokenizer:
    """One id per character of `CHARS` after `SPECIALS`; unknown characters map to <unk>.

    `apply_chat` has the contract of `jaxllm.data.tokenizer.Tokenizer.apply_chat` with a compact
    template: <s>, then per message its role id, its content and </s>; the loss mask is 1 on
    assistant content and its </s>; the generation prompt is the <assistant> id."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    _ROLE_IDS = {"system": 4, "user": 5, "assistant": 6}

    def __init__(self):
        self._ids = {c: len(SPECIALS) + i for i, c in enumerate(CHARS)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(CHARS)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self._ids.get(c, self.unk_id) for c in text]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of `ids`; special ids decode to nothing."""
        return "".join(CHARS[i - len(SPECIALS)] for i in map(int, ids) if len(SPECIALS) <= i < self.vocab_size)

    def apply_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False):
        if not messages:
            raise ValueError("apply_chat needs at least one message, got none")
        ids, mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in self._ROLE_IDS or (role == "system" and i > 0):
                raise ValueError(f"message {i}: role must be one of {sorted(self._ROLE_IDS)} (system only first), "
                                 f"got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
            body = self.encode(content) + [self.eos_id]
            ids += [self._ROLE_IDS[role]] + body
            mask += [0] + [int(role == "assistant")] * len(body)
        if add_generation_prompt:
            ids.append(self._ROLE_IDS["assistant"])
            mask.append(0)
        return ids, mask


@dataclasses.dataclass(frozen=True)
class InstructionTask:
    """Instructions over words of `min_word`–`max_word` letters from `letters`, and additions of
    two numbers in [0, max_number]."""

    letters: str = "abcdefgh"
    min_word: int = 3
    max_word: int = 6
    max_number: int = 49

    def __post_init__(self):
        if not self.letters or not set(self.letters) <= set(string.ascii_lowercase):
            raise ValueError(f"letters must be lowercase ascii letters, got {self.letters!r}")
        if not 1 <= self.min_word <= self.max_word or self.max_number < 1:
            raise ValueError(f"need 1 <= min_word <= max_word and max_number >= 1, got {self.min_word}, "
                             f"{self.max_word}, {self.max_number}")

    def sample_prompt(self, rng: np.random.Generator) -> str:
        op = OPS[int(rng.integers(len(OPS)))]
        if op == "add":
            a, b = rng.integers(0, self.max_number + 1, size=2)
            return f"add {a} {b}"
        n = int(rng.integers(self.min_word, self.max_word + 1))
        return f"{op} " + "".join(rng.choice(list(self.letters), size=n))

    def prompts(self, n: int, rng: np.random.Generator, exclude=frozenset()) -> list[str]:
        """`n` distinct prompts, none in `exclude`."""
        out, seen = [], set(exclude)
        for _ in range(100 * n + 1000):
            if len(out) == n:
                return out
            p = self.sample_prompt(rng)
            if p not in seen:
                seen.add(p)
                out.append(p)
        raise ValueError(f"could not draw {n} distinct prompts outside the {len(exclude)} excluded ones")

    def answer(self, prompt: str) -> str:
        """The correct response; ValueError for text that is not an instruction of this task."""
        op, _, arg = prompt.partition(" ")
        if op == "add":
            parts = arg.split(" ")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                return str(int(parts[0]) + int(parts[1]))
        elif op in OPS and arg and set(arg) <= set(self.letters):
            return {"rev": arg[::-1], "sort": "".join(sorted(arg)), "up": arg.upper()}[op]
        raise ValueError(f"not an instruction of this task: {prompt!r}")

    def perturb(self, prompt: str, rng: np.random.Generator) -> str:
        """A response of random quality: exact, one extra character, extra words, repeated,
        truncated, one character substituted, another operation's answer, random characters or
        unrelated text."""
        answer = self.answer(prompt)
        alphabet = string.digits if answer.isdigit() else (self.letters.upper() if answer.isupper() else self.letters)
        noise = lambda k: "".join(rng.choice(list(alphabet), size=k))  # noqa: E731
        kind = int(rng.integers(9))
        if kind == 0:
            return answer
        if kind == 1:
            return answer + noise(1)
        if kind == 2:
            return answer + " ok"
        if kind == 3:
            return answer + " " + answer
        if kind == 4 and len(answer) > 1:
            return answer[:int(rng.integers(1, len(answer)))]
        if kind == 5:
            i = int(rng.integers(len(answer)))
            return answer[:i] + noise(1) + answer[i + 1:]
        if kind == 6:
            op, _, arg = prompt.partition(" ")
            if op != "add":
                other = [o for o in OPS if o not in ("add", op)]
                return self.answer(f"{other[int(rng.integers(len(other)))]} {arg}")
        if kind == 7:
            return noise(max(1, len(answer) + int(rng.integers(-1, 2))))
        unrelated = string.ascii_lowercase if answer.isdigit() else string.digits
        return "".join(rng.choice(list(unrelated), size=int(rng.integers(2, 9))))


def rubric_bits(task: InstructionTask, prompt: str, response: str) -> tuple[int, ...]:
    """The five criteria of the ground-truth rubric (module docstring), 1 = met."""
    answer = task.answer(prompt)
    overlap = sum((collections.Counter(response) & collections.Counter(answer)).values())
    return (int(overlap > 0), int(2 * overlap >= len(answer)), int(answer in response),
            int(len(response) <= len(answer) + 1), int(response == answer))


def rubric_score(task: InstructionTask, prompt: str, response: str) -> int:
    """Ground-truth additive score 0–5 of any response."""
    return sum(rubric_bits(task, prompt, response))


def eft_target(task: InstructionTask, prompt: str, response: str) -> str:
    """The judgement the EFT data teaches: the criterion bits as a short justification, then the
    score line, e.g. "11010\\nScore: 3"."""
    bits = rubric_bits(task, prompt, response)
    return "".join(map(str, bits)) + f"\nScore: {sum(bits)}"


def ift_items(task: InstructionTask, prompts: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt, correct response) instruction-tuning pairs."""
    return [(p, task.answer(p)) for p in prompts]


def eft_items(task: InstructionTask, prompts: Sequence[str], rng: np.random.Generator,
              per_prompt: int = 2) -> list[tuple[str, str, str]]:
    """(prompt, response, target) judge-training items over perturbed responses, with every score
    capped at the mean count per score present (the paper down-samples its dominant score)."""
    items = [(p, r, eft_target(task, p, r)) for p in prompts for r in (task.perturb(p, rng) for _ in range(per_prompt))]
    by_score = collections.defaultdict(list)
    for item in items:
        by_score[rubric_score(task, item[0], item[1])].append(item)
    cap = math.ceil(len(items) / len(by_score))
    kept = [i for group in by_score.values() for i in group[:cap]]
    order = rng.permutation(len(kept))
    return [kept[i] for i in order]


def judge_sets(task: InstructionTask, prompts: Sequence[str], rng: np.random.Generator,
               num_responses: int = 4) -> list[tuple[str, list[str], list[int]]]:
    """Held-out (prompt, responses, true scores) sets for judge pairwise accuracy; responses of a
    prompt are distinct and not all of one true score."""
    out = []
    for p in prompts:
        for _ in range(100):
            responses = list(dict.fromkeys(task.perturb(p, rng) for _ in range(4 * num_responses)))[:num_responses]
            scores = [rubric_score(task, p, r) for r in responses]
            if len(responses) == num_responses and len(set(scores)) > 1:
                out.append((p, responses, scores))
                break
    return out


SPLITS = ("ift", "eft", "valid", "test")


def split_prompts(task: InstructionTask, sizes: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """Disjoint prompt sets for `SPLITS` (IFT, EFT, validation, test), drawn from `seed`."""
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; known: {list(SPLITS)}")
    rng = np.random.default_rng([seed, 1])
    drawn = task.prompts(sum(sizes.values()), rng)
    out, start = {}, 0
    for name in SPLITS:
        out[name] = drawn[start:start + sizes.get(name, 0)]
        start += sizes.get(name, 0)
    return out


@dataclasses.dataclass(frozen=True)
class PromptGenerator:
    """The fixed prompt source of the self-rewarding iterations (the paper's fixed Llama-2-Chat
    with Self-Instruct): new prompts drawn by a program from (seed, iteration), never by the trained
    model, and never one of `exclude` (the held-out and training prompts)."""

    task: InstructionTask
    seed: int
    exclude: frozenset = frozenset()

    def __call__(self, iteration: int, n: int) -> list[str]:
        return self.task.prompts(n, np.random.default_rng([self.seed, 2, iteration]), self.exclude)
