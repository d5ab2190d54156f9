"""Pair selection, joint prompt+response tokenisation across BPE merges, and pair batching."""
import random

import numpy as np
import pytest

from jaxllm.data.preference import collate_pairs, select_pair, tokenize_pair
from jaxllm.data.tokenizer import Tokenizer

WORDS = "hello world translate this from german to english the cat sat on a mat helpful hallo welt".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small BPE tokenizer in which 'hello' is one piece but 'hel' is not, so prompt 'hel' + response 'lo'
    merges across the boundary."""
    rng = random.Random(0)
    text = tmp_path_factory.mktemp("spm") / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(2000)) + "\n")
    return Tokenizer.train([text], vocab_size=400, out_prefix=text.parent / "pairs")


def _check_side(tok, pair, side, prompt, response):
    ids, mask = pair[f"{side}_tokens"].tolist(), pair[f"{side}_mask"]
    start = int(np.argmax(mask))
    assert ids[:-1] == tok.encode(prompt + response, bos=True)  # the joint tokenisation itself
    assert ids[-1] == tok.eos_id and mask[-1] == 1
    assert mask[0] == 0 and mask[start:].all() and not mask[:start].any()
    # Unscored tokens are prompt-only; everything else (all response characters) is scored.
    assert prompt.startswith(tok.decode(ids[:start]))
    return start


def test_boundary_recovered_when_bpe_merges_across_it(tok):
    prompt, chosen, rejected = "Translate this: hel", "lo world", "p the cat"
    # The test only means something if joint and separate tokenisation differ at the boundary.
    assert tok.encode(prompt + chosen) != tok.encode(prompt) + tok.encode(chosen)[1:]
    assert tok.encode(prompt + chosen)[: len(tok.encode(prompt))] != tok.encode(prompt)

    pair = tokenize_pair(tok, prompt, chosen, rejected)
    chosen_start = _check_side(tok, pair, "chosen", prompt, chosen)
    rejected_start = _check_side(tok, pair, "rejected", prompt, rejected)
    prompt_ids = tok.encode(prompt, bos=True)
    assert chosen_start == len(prompt_ids) - 1  # the merged piece "▁hello" is scored
    assert tok.id_to_piece(pair["chosen_tokens"][chosen_start]) == "▁hello"
    assert rejected_start == len(prompt_ids)
    # The shared prompt: identical leading ids on both sides, a prefix of the prompt's own tokenisation.
    n = pair["prompt_len"]
    assert n == min(chosen_start, rejected_start)
    assert pair["chosen_tokens"][:n].tolist() == pair["rejected_tokens"][:n].tolist() == prompt_ids[:n]


def test_boundary_without_merge_is_the_prompt_length(tok):
    prompt = "Translate this from german to english:\nhallo welt\nenglish:"
    pair = tokenize_pair(tok, prompt, " hello world", " the cat")
    for side, response in (("chosen", " hello world"), ("rejected", " the cat")):
        assert _check_side(tok, pair, side, prompt, response) == len(tok.encode(prompt, bos=True))
    assert pair["prompt_len"] == len(tok.encode(prompt, bos=True))


def test_long_prompt_is_cut_from_the_left_identically(tok):
    prompt = " ".join(WORDS * 4) + ":"
    pair = tokenize_pair(tok, prompt, " hello", " the cat sat on a mat", max_len=24, max_prompt_len=10)
    assert pair["prompt_len"] == 10
    for side, response in (("chosen", " hello"), ("rejected", " the cat sat on a mat")):
        ids = pair[f"{side}_tokens"].tolist()
        assert len(ids) <= 24 and ids[0] == tok.bos_id
        full = tok.encode(prompt + response, bos=True) + [tok.eos_id]
        assert ids[1:] == full[len(full) - len(ids) + 1:]  # BOS kept, oldest prompt tokens dropped
        assert pair[f"{side}_mask"][10:].all() and not pair[f"{side}_mask"][:10].any()
    assert pair["chosen_tokens"][:10].tolist() == pair["rejected_tokens"][:10].tolist()


def test_tokenize_pair_errors(tok):
    with pytest.raises(ValueError, match="empty response"):
        tokenize_pair(tok, "Translate:", "", " hello")
    with pytest.raises(ValueError, match="empty response"):
        tokenize_pair(tok, "Translate:", " hello", "")
    with pytest.raises(ValueError, match="nothing precedes"):
        tokenize_pair(tok, "", "hello", "world", add_bos=False)
    with pytest.raises(ValueError, match="max_prompt_len"):
        tokenize_pair(tok, "Translate:", " hello", " world", max_len=8, max_prompt_len=8)


def test_collate_pairs_pads_both_sides_to_one_shape(tok):
    pairs = [tokenize_pair(tok, "Translate this: hel", "lo world", "p"),
             tokenize_pair(tok, "english:", " the cat sat on a mat", " hello")]
    longest = max(len(p[f"{s}_tokens"]) for p in pairs for s in ("chosen", "rejected"))
    batch = collate_pairs(pairs, pad_id=tok.pad_id, multiple=8)
    T = -(-longest // 8) * 8
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_tokens"].shape == batch[f"{side}_mask"].shape == (2, T)
        np.testing.assert_array_equal(batch[f"{side}_positions"], np.tile(np.arange(T), (2, 1)))
        for row, pair in enumerate(pairs):
            n = len(pair[f"{side}_tokens"])
            np.testing.assert_array_equal(batch[f"{side}_tokens"][row, :n], pair[f"{side}_tokens"])
            np.testing.assert_array_equal(batch[f"{side}_mask"][row, :n], pair[f"{side}_mask"])
            assert (batch[f"{side}_tokens"][row, n:] == tok.pad_id).all()
            assert not batch[f"{side}_mask"][row, n:].any()
            np.testing.assert_array_equal(batch[f"{side}_segment_ids"][row], np.arange(T) < n)
    assert collate_pairs(pairs, pad_id=tok.pad_id, length=40)["rejected_tokens"].shape == (2, 40)
    with pytest.raises(ValueError, match="more than length=4"):
        collate_pairs(pairs, pad_id=tok.pad_id, length=4)
    with pytest.raises(ValueError, match="pad_id"):
        collate_pairs(pairs, pad_id=-1)


def test_select_pair_best_vs_worst_middle_dropped():
    assert select_pair(["ref", "gpt4", "alma"], [0.7, 0.9, 0.2]) == ("gpt4", "alma")
    assert select_pair(["a", "b", "c", "d"], np.array([0.5, 0.1, 0.8, 0.3])) == ("c", "b")
    # Ties within the best (or the worst) go to the first candidate in order.
    assert select_pair(["ref", "gpt4", "alma"], [0.9, 0.9, 0.2]) == ("ref", "alma")
    assert select_pair(["ref", "gpt4", "alma"], [0.9, 0.2, 0.2]) == ("ref", "gpt4")
    # No preference when every score ties: dropped, or (ALMA-R code) the first candidate twice.
    assert select_pair(["ref", "gpt4", "alma"], [0.4, 0.4, 0.4]) is None
    assert select_pair(["ref", "gpt4", "alma"], [0.4, 0.4, 0.4], drop_ties=False) == ("ref", "ref")


def test_select_pair_errors():
    with pytest.raises(ValueError, match="does not match 3 candidates"):
        select_pair(["a", "b", "c"], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2"):
        select_pair(["a"], [0.1])
    with pytest.raises(ValueError, match="finite"):
        select_pair(["a", "b"], [0.1, float("nan")])


def test_read_triplets_names_the_file_and_line_of_bad_input(tmp_path):
    from jaxllm.data.pairs import read_triplets

    good = '{"prompt": "p", "chosen": "c", "rejected": "r"}'
    path = tmp_path / "pairs.jsonl"
    path.write_text(good + "\n\n" + good + "\n")
    assert read_triplets(path) == [("p", "c", "r"), ("p", "c", "r")]
    for body, fragment in ((good + "\nnot json\n", f"{path}:2: invalid JSON"),
                           (good + "\n[1, 2]\n", f"{path}:2: expected a JSON object, got list"),
                           ('{"prompt": "p", "chosen": 3, "rejected": "r"}\n', f"{path}:1 lacks text fields ['chosen']"),
                           ("", f"preference file {path} holds no records")):
        path.write_text(body)
        with pytest.raises(ValueError) as info:
            read_triplets(path)
        assert fragment in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_triplets(tmp_path / "missing.jsonl")
