"""Toy translation task: the reordering rule on hand examples, gilded references (one edit, at the set
rate), disjoint splits, word tokenisation through joint pair tokenisation, chrF against sacreBLEU, and
oracle pair building."""
import numpy as np
import pytest

from jaxllm.data.preference import tokenize_pair
from jaxllm.data.tasks import translation as tr

TASK = tr.TranslationTask()


def words_edit_distance(a, b):
    """Levenshtein distance between word lists (float64-free plain DP)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_lexicon_is_a_bijection_between_disjoint_vocabularies():
    source, target = list(TASK.dictionary), list(TASK.dictionary.values())
    assert len(source) == len(set(source)) == TASK.n_heads + TASK.n_modifiers
    assert len(set(target)) == len(target) and not set(source) & set(target)
    assert set(TASK.heads) | set(TASK.modifiers) == set(source) and not set(TASK.heads) & set(TASK.modifiers)
    assert tr.TranslationTask(lexicon_seed=1).dictionary != TASK.dictionary


def test_modifier_before_head_moves_after_it():
    (m1, m2), (h1, h2) = TASK.modifiers[:2], TASK.heads[:2]
    d = TASK.dictionary
    # m1 h1 -> h1 m1; m2 m2 h2: only the modifier adjacent to the head moves; trailing m1 stays.
    source = [m1, h1, m2, m2, h2, h1, m1]
    assert TASK.translate(source) == [d[h1], d[m1], d[m2], d[h2], d[m2], d[h1], d[m1]]
    assert TASK.translate([h1, m1, h2]) == [d[h1], d[h2], d[m1]]
    assert TASK.translate([m1, m2]) == [d[m1], d[m2]]
    with pytest.raises(ValueError, match="not in the task's dictionary"):
        TASK.translate([h1, "zzz"])


def test_gilded_references_have_one_edit_at_the_set_rate():
    rng = np.random.default_rng(0)
    n, edits, drops = 4000, 0, 0
    for _ in range(n):
        truth = TASK.translate(TASK.sample_source(rng))
        ref = TASK.gild(truth, rng)
        distance = words_edit_distance(truth, ref)
        assert distance in (0, 1)
        edits += distance
        drops += len(ref) == len(truth) - 1
    # Binomial(4000, 0.3): 5 standard deviations is about ±0.036.
    assert abs(edits / n - TASK.reference_error_rate) < 0.036
    assert abs(drops / max(edits, 1) - TASK.drop_prob) < 0.07
    assert TASK.gild(["fa"], rng, error_rate=0.0) == ["fa"]
    example = TASK.example(rng)
    assert example["target"].split() == TASK.translate(example["source"].split())
    assert words_edit_distance(example["reference"].split(), example["target"].split()) <= 1


def test_splits_are_disjoint_deterministic_and_in_range():
    splits = TASK.sources({"train": 300, "test": 100}, seed=3)
    assert splits == TASK.sources({"train": 300, "test": 100}, seed=3)
    as_set = {k: {tuple(s) for s in v} for k, v in splits.items()}
    assert len(as_set["train"]) == 300 and len(as_set["test"]) == 100 and not as_set["train"] & as_set["test"]
    assert all(TASK.min_words <= len(s) <= TASK.max_words for v in splits.values() for s in v)
    with pytest.raises(ValueError, match="cannot draw"):
        tr.TranslationTask(n_heads=1, n_modifiers=1, min_words=2, max_words=2).sources({"a": 10}, seed=0)


def test_pairs_tokenise_one_word_per_token_with_the_boundary_after_the_separator():
    tok = TASK.tokenizer()
    rng = np.random.default_rng(1)
    source = TASK.sample_source(rng)
    truth = TASK.translate(source)
    wrong = TASK.corrupt(truth, rng)
    pair = tokenize_pair(tok, tr.prompt(source), tr.response(truth), tr.response(wrong), max_len=32, max_prompt_len=16)
    n_prompt = 1 + len(source) + 1  # BOS, source words, separator
    assert pair["prompt_len"] == n_prompt
    assert pair["chosen_tokens"][n_prompt - 1] == tr.SEP_ID and pair["chosen_tokens"][-1] == tok.eos_id
    assert pair["chosen_mask"].tolist() == [0] * n_prompt + [1] * (len(truth) + 1)
    assert tok.decode(pair["chosen_tokens"][n_prompt:]) == " ".join(truth)
    assert tok.decode(pair["rejected_tokens"][n_prompt:]) == " ".join(wrong)
    assert tok.decode([tok.vocab_size + 3]) == "<unk>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("hello")


def test_chrf_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu", reason="chrF parity needs sacrebleu (pip install sacrebleu)")
    chrf_ref = sacrebleu.metrics.CHRF()
    rng = np.random.default_rng(2)
    cases = [("", "fa lo"), ("fa", "fa"), ("a", "ab"), ("xy", "ab"), ("fa lo", "")]
    for _ in range(200):
        truth = TASK.translate(TASK.sample_source(rng))
        hyp = truth
        for _ in range(int(rng.integers(0, 4))):
            hyp = TASK.corrupt(hyp, rng)
        cases.append((" ".join(hyp), " ".join(truth)))
    for hyp, ref in cases:
        assert tr.chrf(hyp, ref) == pytest.approx(chrf_ref.sentence_score(hyp, [ref]).score, abs=1e-9), (hyp, ref)
    assert tr.exact_match("a  b", "a b") == 1.0 and tr.exact_match("a b", "a c") == 0.0


def test_build_triplets_keeps_best_and_worst_and_drops_ties():
    rng = np.random.default_rng(4)
    sources = TASK.sources({"s": 3}, seed=5)["s"]
    truths = [TASK.translate(s) for s in sources]
    one_error = TASK.corrupt(truths[0], rng)
    two_errors = TASK.corrupt(TASK.corrupt(truths[0], rng), rng)
    candidates = [[one_error, truths[0], two_errors], [truths[1], truths[1], truths[1]], [truths[2], one_error, truths[2]]]
    triplets, info = tr.build_triplets(TASK, sources, candidates)
    assert [i["source"] for i in info] == [0, 2]  # source 1: all tie, dropped
    assert info[0]["chosen"] == 1 and info[0]["chosen_exact"] and info[1]["rejected"] == 1
    assert triplets[0] == (tr.prompt(sources[0]), tr.response(truths[0]),
                           tr.response(min([one_error, two_errors], key=lambda c: tr.chrf(" ".join(c), " ".join(truths[0])))))
    with pytest.raises(ValueError, match="candidate lists"):
        tr.build_triplets(TASK, sources, candidates[:2])


def test_synthetic_triplets_keep_the_expected_share():
    sources = TASK.sources({"s": 2000}, seed=6)["s"]
    triplets = tr.synthetic_triplets(TASK, sources, np.random.default_rng(7), (0.1, 0.25))
    # A source is kept unless all three candidates are perfect: 1 - 0.7 * 0.9 * 0.75 = 0.5275 (sd 0.011).
    assert abs(len(triplets) / len(sources) - 0.5275) < 0.05


def test_bad_task_config_raises():
    with pytest.raises(ValueError, match="min_words"):
        tr.TranslationTask(min_words=5, max_words=4)
    with pytest.raises(ValueError, match="reference_error_rate"):
        tr.TranslationTask(reference_error_rate=1.5)
    with pytest.raises(ValueError, match="pseudo-words"):
        tr.TranslationTask(n_heads=3000)
