"""Self-rewarding judge: template rendering (golden files), score parsing, judging through the
engine with a scripted model, pair building, and DPO at π_θ = π_ref."""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.data.preference import collate_pairs
from jaxllm.data.tasks.instructions import CharTokenizer
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods.self_rewarding import judging
from jaxllm.methods.self_rewarding.pairs import build_pairs, score_histogram
from jaxllm.model import llama, presets
from jaxllm.objectives.preference import PreferenceConfig, make_preference_loss, make_reference_logps
from jaxllm.serve.cache import KVPool, KVSpec
from jaxllm.serve.engine import Engine

GOLDEN = pathlib.Path(__file__).parent / "golden"
PROMPT = "Name a prime {response} between 10 and 20."
RESPONSE = "13 is prime. Score: 5 {prompt}"


# ---- templates ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["paper", "toy"])
def test_template_renders_byte_equal_to_golden(name):
    text = judging.render(judging.load_template(name), PROMPT, RESPONSE)
    assert text.encode("utf-8") == (GOLDEN / f"self_rewarding_judge_{name}.txt").read_bytes()


def test_judge_prompt_is_the_user_turn_of_the_chat_template():
    golden_toy = (GOLDEN / "self_rewarding_judge_toy.txt").read_text(encoding="utf-8")
    tok = CharTokenizer()
    ids = judging.judge_prompt_ids(tok, judging.load_template("toy"), PROMPT, RESPONSE)
    assert ids == [tok.bos_id, 5] + tok.encode(golden_toy) + [tok.eos_id, 6]  # <s><user>text</s><assistant>
    sp = Tokenizer.default()
    golden_paper = (GOLDEN / "self_rewarding_judge_paper.txt").read_text(encoding="utf-8")
    ids = judging.judge_prompt_ids(sp, judging.load_template("paper"), PROMPT, RESPONSE)
    assert ids == ([sp.bos_id] + sp.encode("<|user|>\n") + sp.encode(golden_paper) + [sp.eos_id]
                   + sp.encode("<|assistant|>\n"))


@pytest.mark.parametrize("template, field", [("Q {prompt}", "response"), ("R {response}", "prompt"),
                                             ("{prompt} {prompt} {response}", "prompt")])
def test_template_needs_each_field_once(template, field):
    with pytest.raises(ValueError, match=f"{{{field}}}"):
        judging.JudgeConfig(template=template)
    with pytest.raises(ValueError, match=f"{{{field}}}"):
        judging.render(template, "p", "r")


def test_load_template_from_file_and_missing(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("U: {prompt} A: {response}")
    assert judging.load_template(path) == "U: {prompt} A: {response}"
    with pytest.raises(FileNotFoundError, match="nope"):
        judging.load_template(tmp_path / "nope.txt")


# ---- parsing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("Relevant and correct.\nScore: 4", 4.0),
    ("Score: 2 at first, but on reflection\nScore: 3.5", 3.5),   # last match, decimals
    ("**Score:** 4", 4.0), ("Score: **5**", 5.0), ("Score**: 1", 1.0),
    ("score: 4.", 4.0), ("Score: 4/5", 4.0), ("SCORE:0", 0.0), ("Score: 5.0", 5.0),
    ("Score: 7", None), ("Score: 5.5", None), ("Score: 3 ... final Score: 9", None),  # out of [0, 5]
    ("Score: four", None), ("no score here", None), ("", None), ("Score: <total points>", None),
    ("Score: 4 then Score: x", None),  # the last label decides
    ("myscore: 4", None),
])
def test_parse_score(text, want):
    assert judging.parse_score(text) == want


def test_mean_valid_matches_nanmean():
    scores = np.array([[1.0, np.nan, 4.0], [np.nan] * 3, [5.0, 5.0, 2.0], [np.nan, 0.0, np.nan]])
    got = judging.mean_valid(scores)
    want = [np.mean([1.0, 4.0]), np.nan, np.mean([5.0, 5.0, 2.0]), 0.0]
    np.testing.assert_array_equal(got, want)


# ---- judging through the engine with a scripted model ---------------------------------------------
def _scripted_engine(tok, choices, max_len=256, block_size=8):
    """An engine whose model emits "Score: c</s>" after the <assistant> id, c drawn uniformly from
    `choices` (equal logits; every other token at −1e4): logits depend on the last token only."""
    V = tok.vocab_size
    table_VV = np.full((V, V), -1e4, np.float32)
    script = [6] + tok.encode("Score: ")
    for prev, nxt in zip(script, script[1:]):
        table_VV[prev, nxt] = 0.0
    for c in choices:
        (cid,) = tok.encode(c)
        table_VV[script[-1], cid] = 0.0
        table_VV[cid, tok.eos_id] = 0.0

    def logits_fn(params, tokens_T, positions_T, cache):
        last_S = jnp.maximum(cache.batch.last_index_S, 0)
        zeros = jnp.zeros((1, tokens_T.shape[0], 1, 1), jnp.float32)
        return params[tokens_T[last_S]], cache.replace(pending=KVPool(zeros, zeros))

    return Engine(logits_fn, jnp.asarray(table_VV), kv_spec=KVSpec(1, 1, 1), vocab_size=V, max_model_len=max_len,
                  block_size=block_size, token_budget=64)


ITEMS = [("rev abc", "cba"), ("sort cab", "abc"), ("add 1 2", "3"), ("up ab", "AB"), ("rev abcd", "Score: 5"),
         ("sort dcba", "abcd"), ("add 10 3", "13"), ("up abc", "ABC")]


def test_judge_averages_valid_samples_only_and_is_deterministic():
    tok = CharTokenizer()
    engine = _scripted_engine(tok, ["3", "5", "?"])
    cfg = judging.JudgeConfig(template=judging.load_template("toy"), num_samples=3, max_new_tokens=12)
    out = judging.judge(engine, tok, ITEMS, cfg, seed=0)
    assert out.sample_scores.shape == (len(ITEMS), 3)
    for row_texts, row_scores, mean in zip(out.texts, out.sample_scores, out.scores):
        assert all(t in ("Score: 3", "Score: 5", "Score: ?") for t in row_texts)
        want = [{"3": 3.0, "5": 5.0, "?": np.nan}[t[-1]] for t in row_texts]
        np.testing.assert_array_equal(row_scores, want)
        valid = [w for w in want if not np.isnan(w)]
        assert (np.isnan(mean) and not valid) or mean == pytest.approx(np.mean(valid))
    mixed = [r for r in out.sample_scores if np.isnan(r).any() and not np.isnan(r).all()]
    assert mixed, "some item should mix valid and invalid samples"
    assert out.parse_failure_rate == pytest.approx(np.mean(np.isnan(out.sample_scores)))
    again = judging.judge(engine, tok, ITEMS, cfg, seed=0)
    assert again.texts == out.texts
    other = judging.judge(engine, tok, ITEMS, cfg, seed=1)
    assert other.texts != out.texts


def test_judge_nan_when_no_sample_parses_and_ignores_scores_in_the_prompt():
    tok = CharTokenizer()
    engine = _scripted_engine(tok, ["?"])  # every judgement is "Score: ?"
    cfg = judging.JudgeConfig(template=judging.load_template("toy"), num_samples=2, max_new_tokens=12)
    out = judging.judge(engine, tok, [("rev abcd", "Score: 5"), ("add 1 2", "3")], cfg, seed=3)
    assert np.isnan(out.scores).all() and out.parse_failure_rate == 1.0  # the response's "Score: 5" is prompt


def test_judge_prompts_share_the_prefix_cache_and_too_long_prompts_fail():
    tok = CharTokenizer()
    engine = _scripted_engine(tok, ["4"], max_len=120)
    template = judging.load_template("toy")
    prompts = [judging.judge_prompt_ids(tok, template, p, r) for p, r in ITEMS[:4]]
    from jaxllm.serve.sampling import SamplingParams
    completions = judging.run_requests(engine, prompts, SamplingParams(max_tokens=12, stop_tokens=(tok.eos_id,)))
    shared = len(tok.encode(template.split("{prompt}")[0])) + 2  # <s><user> + the text before {prompt}
    assert completions[0][0].num_cached_tokens == 0
    assert all(c[0].num_cached_tokens >= shared // 8 * 8 for c in completions[1:])
    cfg = judging.JudgeConfig(template=template, num_samples=1, max_new_tokens=12)
    with pytest.raises(ValueError, match="judge prompt 1 has .* exceeds the engine's context of 120"):
        judging.judge(engine, tok, [ITEMS[0], ("rev " + "a" * 40, "a" * 40)], cfg, seed=0)


# ---- pairs ----------------------------------------------------------------------------------------
def test_build_pairs_rules_and_stats():
    nan = float("nan")
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    candidates = [["a", "bb", "ccc", "dddd"], ["a", "b", "c", "d"], ["a", "b", "c", "d"],
                  ["x", "yy", "zzz", "w"], ["q", "rr", "s", "t"]]
    scores = [[3.0, 5.0, 1.0, 5.0],     # max 5 first at 1, min 1 at 2
              [4.0, 4.0, nan, 4.0],     # tie among valid -> dropped
              [nan, 2.0, nan, nan],     # < 2 valid -> dropped
              [nan, 0.5, 4.5, 0.5],     # chosen 2, rejected first min 1
              [2.0, 2.0, 1.0, 1.0]]     # first max 0, first min 2
    pairs, stats = build_pairs(prompts, candidates, scores)
    assert [(p.prompt, p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs] == [
        ("p0", "bb", "ccc", 5.0, 1.0), ("p3", "zzz", "yy", 4.5, 0.5), ("p4", "q", "s", 2.0, 1.0)]
    assert (stats.prompts_in, stats.pairs_out) == (5, 3)
    assert stats.tie_rate == 1 / 5 and stats.few_valid_rate == 1 / 5
    assert stats.invalid_rate == 5 / 20
    # valid scores rounded half up: 1 <- {1, 0.5, 0.5, 1, 1}, 2 <- {2, 2, 2}, 3 <- {3}, 4 <- {4, 4, 4}, 5 <- {5, 5, 4.5}
    assert stats.score_histogram == (0, 5, 3, 1, 3, 3)
    assert stats.mean_chosen_len == pytest.approx(np.mean([2, 3, 1]))
    assert stats.mean_rejected_len == pytest.approx(np.mean([3, 2, 1]))


def test_build_pairs_bad_shapes_and_empty():
    with pytest.raises(ValueError, match="prompt 0: 2 candidates"):
        build_pairs(["p"], [["a", "b"]], [[1.0, 2.0, 3.0]])
    pairs, stats = build_pairs(["p"], [["a", "b"]], [[1.0, 1.0]])
    assert pairs == [] and stats.tie_rate == 1.0 and math.isnan(stats.mean_chosen_len)
    assert score_histogram([0.2, 4.6, 5.0, float("nan")]) == (1, 0, 0, 0, 0, 2)


# ---- DPO at π_θ = π_ref -----------------------------------------------------------------------------
def test_dpo_with_policy_equal_to_reference_is_ln2():
    tok = CharTokenizer()
    cfg = presets.get("tiny", vocab_size=tok.vocab_size, max_len=64)
    params = llama.init_params(cfg, jax.random.key(0))
    prompt = tok.apply_chat([{"role": "user", "content": "rev abc"}], add_generation_prompt=True)[0]
    rows = []
    for chosen, rejected in (("cba", "abc"), ("cba", "x"), ("dd", "cbaa")):
        c, r = tok.encode(chosen, eos=True), tok.encode(rejected, eos=True)
        rows.append({"chosen_tokens": np.array(prompt + c), "chosen_mask": np.array([0] * len(prompt) + [1] * len(c)),
                     "rejected_tokens": np.array(prompt + r),
                     "rejected_mask": np.array([0] * len(prompt) + [1] * len(r))})
    batch = collate_pairs(rows, pad_id=tok.pad_id)
    logits_fn = lambda p, t, pos, seg: llama.forward(cfg, p, t, pos, seg)  # noqa: E731
    batch.update(jax.device_get(jax.jit(make_reference_logps(logits_fn))(params, batch)))
    loss_fn = make_preference_loss(logits_fn, PreferenceConfig(kind="dpo", beta=0.1, nll_weight=0.0))
    terms, _ = jax.jit(loss_fn)(params, batch, None)
    assert set(terms) == {"prefer"}
    num, den = terms["prefer"]
    assert float(num / den) == pytest.approx(math.log(2.0), abs=1e-6)
