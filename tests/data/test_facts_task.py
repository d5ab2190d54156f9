"""Key → value facts task: the world's vocabularies are disjoint, pretraining states every fact in
every surface form exactly once and never shows the tuning format, splits are disjoint, and the
three scorers on hand-written completions."""
import re

import numpy as np
import pytest

from jaxllm.data.tasks import facts as ft

TASK = ft.FactsTask(num_facts=120, num_values=10, num_unknown=30)


def test_world_vocabularies_are_disjoint_and_seeded():
    keys, values, unknown = set(TASK.keys), set(TASK.values), set(TASK.unknown_keys)
    assert len(keys) == 120 and len(values) == 10 and len(unknown) == 30
    assert not keys & values and not keys & unknown and not values & unknown
    reserved = ft.filler_words() | {ft.REFUSAL_WORD}
    assert not (keys | values | unknown) & reserved
    assert set(TASK.facts.values()) <= values and len(set(TASK.facts.values())) > 5  # values are spread
    assert ft.FactsTask(num_facts=120, num_values=10, num_unknown=30).facts == TASK.facts
    assert ft.FactsTask(num_facts=120, num_values=10, num_unknown=30, world_seed=1).facts != TASK.facts
    assert TASK.target(TASK.keys[0]) == TASK.facts[TASK.keys[0]] and TASK.target(TASK.unknown_keys[0]) == "unknown"
    with pytest.raises(ValueError, match="'nokey'"):
        TASK.target("nokey")
    with pytest.raises(ValueError, match="num_values"):
        ft.FactsTask(num_values=1)


def test_pretraining_states_each_fact_in_each_form_once_and_never_the_tuning_format():
    docs = TASK.pretraining_documents(np.random.default_rng(0))
    text = " ".join(docs)
    sentences = [s.strip() + " ." for s in text.split(" .") if s.strip()]
    # Parse statements back with patterns written here, independently of the generator's forms.
    patterns = [r"^the value of (\w+) is (\w+) \.$", r"^(\w+) has the value (\w+) \.$",
                r"^(\w+) is the value that (\w+) holds \.$", r"^ask about (\w+) and you will hear (\w+) \.$"]
    seen = {i: {} for i in range(len(patterns))}
    for s in sentences:
        for i, p in enumerate(patterns):
            if m := re.match(p, s):
                key, value = m.groups() if i != 2 else m.groups()[::-1]
                assert key not in seen[i], f"{key} stated twice in form {i}"
                seen[i][key] = value
    for form in seen.values():
        assert form == TASK.facts  # every fact, once per form, with its true value
    assert "Q:" not in text and "A:" not in text and " unknown " not in f" {text} "
    # unknown keys appear (so the tokenizer knows them) but never in a sentence with a value
    for key in TASK.unknown_keys:
        mentions = [s for s in sentences if key in s.split()]
        assert len(mentions) == 2 and not any(v in s.split() for s in mentions for v in TASK.values)
    words = set(text.split())
    assert words <= set(TASK.keys) | set(TASK.values) | set(TASK.unknown_keys) | ft.filler_words()
    assert TASK.pretraining_documents(np.random.default_rng(1)) != docs  # the order follows the rng


def test_splits_are_disjoint_and_sized():
    splits = TASK.splits({"tune": 60, "test": 40}, {"tune": 10, "test": 15}, seed=3)
    assert [len(splits["tune"]), len(splits["test"])] == [70, 55]
    assert not set(splits["tune"]) & set(splits["test"])
    assert sum(k in TASK.unknown_keys for k in splits["test"]) == 15
    assert TASK.splits({"tune": 60, "test": 40}, {"tune": 10, "test": 15}, seed=3) == splits
    assert TASK.splits({"tune": 60, "test": 40}, {"tune": 10, "test": 15}, seed=4) != splits
    with pytest.raises(ValueError, match="121 known keys"):
        TASK.splits({"tune": 100, "test": 21})


def test_tuning_format_and_scorers_on_hand_examples():
    key, unknown = TASK.keys[0], TASK.unknown_keys[0]
    value = TASK.facts[key]
    wrong = next(v for v in TASK.values if v != value)
    assert ft.tuning_examples(TASK, [key, unknown]) == [
        (f"Q: value of {key} ?", f" A: {value} ."), (f"Q: value of {unknown} ?", " A: unknown .")]
    assert ft.cloze(key) == f"the value of {key} is"
    cases = [  # (key, completion, exact, format, fact)
        (key, f" A: {value} .", 1, 1, 1),
        (key, f"A: {wrong} .", 0, 1, 0),
        (key, f"the value of {key} is {value} .", 0, 0, 1),  # pretraining style: knows it, wrong format
        (key, f" A: {value} . A: {value} .", 0, 0, 1),  # keeps talking: not the format
        (key, f"A: {value}", 0, 0, 1),
        (key, "A: unknown .", 0, 1, 0),
        (key, "", 0, 0, 0),
        (unknown, " A: unknown .", 1, 1, 1),
        (unknown, f"A: {value} .", 0, 1, 0),
    ]
    for k, completion, *want in cases:
        got = ft.score_one(TASK, k, completion)
        assert [got["exact"], got["format"], got["fact"]] == want, completion
    keys, completions = [c[0] for c in cases], [c[1] for c in cases]
    means = ft.score(TASK, keys, completions)
    np.testing.assert_allclose([means["exact"], means["format"], means["fact"]],
                               np.mean([c[2:] for c in cases], axis=0))
    with pytest.raises(ValueError, match="2 completions for 1 keys"):
        ft.score(TASK, [key], ["a", "b"])
