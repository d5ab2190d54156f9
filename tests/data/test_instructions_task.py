"""The self-rewarding toy task: answers, the ground-truth rubric, EFT targets, splits, tokenizer."""
import collections

import numpy as np
import pytest

from jaxllm.data.tasks import instructions as ins
from jaxllm.methods.self_rewarding.judging import parse_score

TASK = ins.InstructionTask()


@pytest.mark.parametrize("prompt, answer", [("rev cabd", "dbac"), ("sort cabd", "abcd"), ("up cab", "CAB"),
                                            ("add 12 7", "19"), ("add 0 0", "0")])
def test_answers(prompt, answer):
    assert TASK.answer(prompt) == answer


@pytest.mark.parametrize("prompt", ["rev", "rev xyz", "mul 2 3", "add 1", "add a b", "sort ABC"])
def test_bad_instruction_raises(prompt):
    with pytest.raises(ValueError, match="not an instruction"):
        TASK.answer(prompt)


@pytest.mark.parametrize("prompt, response, bits", [
    ("rev abc", "cba", (1, 1, 1, 1, 1)),
    ("rev abc", "cbax", (1, 1, 1, 1, 0)),       # answer + one character
    ("rev abc", "cba ok", (1, 1, 1, 0, 0)),     # answer with extra words
    ("rev abc", "cb", (1, 1, 0, 1, 0)),         # truncated
    ("rev abcd", "d", (1, 0, 0, 1, 0)),         # a quarter of the characters
    ("add 12 7", "x", (0, 0, 0, 1, 0)),         # short, unrelated
    ("add 12 7", "abcdefg", (0, 0, 0, 0, 0)),
    ("up ab", "AB AB", (1, 1, 1, 0, 0)),
])
def test_rubric_by_hand(prompt, response, bits):
    assert ins.rubric_bits(TASK, prompt, response) == bits
    assert ins.rubric_score(TASK, prompt, response) == sum(bits)


def test_eft_target_parses_to_the_true_score_and_eft_is_balanced():
    rng = np.random.default_rng(0)
    prompts = TASK.prompts(300, rng)
    items = ins.eft_items(TASK, prompts, rng, per_prompt=2)
    for prompt, response, target in items:
        assert parse_score(target) == ins.rubric_score(TASK, prompt, response)
        assert target.split("\n")[0] == "".join(map(str, ins.rubric_bits(TASK, prompt, response)))
    counts = collections.Counter(ins.rubric_score(TASK, p, r) for p, r, _ in items)
    assert set(counts) == {0, 1, 2, 3, 4, 5}
    assert max(counts.values()) <= -(-600 // len(counts))  # the dominant score is capped


def test_splits_are_disjoint_and_the_generator_excludes_them():
    splits = ins.split_prompts(TASK, {"ift": 50, "eft": 40, "valid": 10, "test": 20}, seed=3)
    assert [len(splits[k]) for k in ins.SPLITS] == [50, 40, 10, 20]
    everything = [p for v in splits.values() for p in v]
    assert len(set(everything)) == len(everything)
    assert splits == ins.split_prompts(TASK, {"ift": 50, "eft": 40, "valid": 10, "test": 20}, seed=3)
    gen = ins.PromptGenerator(TASK, seed=3, exclude=frozenset(everything))
    new = gen(1, 200)
    assert len(set(new)) == 200 and not set(new) & set(everything)
    assert gen(1, 200) == new and gen(2, 200) != new
    with pytest.raises(ValueError, match="unknown splits"):
        ins.split_prompts(TASK, {"train": 3}, seed=0)


def test_judge_sets_have_distinct_responses_and_scores():
    sets = ins.judge_sets(TASK, TASK.prompts(30, np.random.default_rng(1)), np.random.default_rng(2))
    assert len(sets) == 30
    for prompt, responses, scores in sets:
        assert len(set(responses)) == 4 and len(set(scores)) > 1
        assert scores == [ins.rubric_score(TASK, prompt, r) for r in responses]


def test_char_tokenizer_round_trip_and_chat():
    tok = ins.CharTokenizer()
    text = "Score: 4\nrev abc {x}"
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.encode("é") == [tok.unk_id]
    ids, mask = tok.apply_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert ids == [1, 5] + tok.encode("hi") + [2, 6] + tok.encode("yo") + [2]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    ids, mask = tok.apply_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ids[-1] == 6 and mask == [0] * len(ids)
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat([{"role": "bot", "content": "x"}])
