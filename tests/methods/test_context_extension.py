"""Context extension: what each transform keeps below the pretrained window, the entropy property
behind EABF, the answer-only SFT, the entropy probe, and the end-to-end recipe with its saved
model (reload in jaxllm and in HF transformers)."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.data.tasks import long_context as lc
from jaxllm.methods import context_extension as ce
from jaxllm.model import llama, presets, rope
from jaxllm.model import model_dir

K = 32
C = 64  # pretrained window of the spec-level tests
BASE = rope.default(K, 10_000.0)
forward = jax.jit(llama.forward, static_argnums=0)  # one compile per config instead of eager ops


def rotate64(x_TK, positions, inv_freq):
    """float64 NumPy RoPE ("rotate half" pairing) of rows x_TK at `positions`."""
    half = x_TK.shape[-1] // 2
    ang = positions[:, None] * np.concatenate([inv_freq, inv_freq])[None]
    rot = np.concatenate([-x_TK[:, half:], x_TK[:, :half]], axis=-1)
    return x_TK * np.cos(ang) + rot * np.sin(ang)


def theta64(base):
    return 1.0 / base ** (np.arange(0, K, 2) / K)


def test_extend_spec_frequencies_match_the_method_formulas():
    s = 4.0
    th = theta64(10_000.0)
    expected = {
        "none": th, "pi": th / s, "ntk": theta64(10_000.0 * s ** (K / (K - 2))),
        "abf": theta64(500_000.0), "eabf": theta64(500_000.0), "eabf_all": theta64(500_000.0),
        "dynamic_ntk": th,  # plain RoPE frequencies; the base grows only past the window
    }
    for method, inv in expected.items():
        spec = ce.extend_spec(BASE, method, s, C)
        np.testing.assert_allclose(spec.inv_freq, inv, rtol=2e-6, err_msg=method)
    # YaRN (NTK-by-parts): γ_j = 1 keeps θ_j, γ_j = 0 interpolates θ_j / s, linear ramp between.
    dim = lambda r: K * math.log(C / (2 * math.pi * r)) / (2 * math.log(10_000.0))
    low, high = max(math.floor(dim(32.0)), 0), min(math.ceil(dim(1.0)), K - 1)
    ramp = np.clip((np.arange(K // 2) - low) / (high - low), 0, 1)
    np.testing.assert_allclose(ce.extend_spec(BASE, "yarn", s, C).inv_freq, th / s * ramp + th * (1 - ramp), rtol=2e-6)


@pytest.mark.parametrize("method,kept", [
    ("yarn", "high"),  # YaRN keeps the high-frequency pairs, interpolates the low-frequency ones
    ("ntk", "highest"),  # NTK-aware: the highest frequency (θ_0 = 1) is untouched
    ("none", "all"),
])
def test_rotations_kept_by_each_method(method, kept):
    """Rotated vectors of the kept pairs equal the original rotation at positions up to 4× the
    window (float64 NumPy reference); YaRN's pairs with wavelengths beyond the window equal
    position interpolation. Window 1024, so that some pairs turn more than β_fast = 32 times."""
    s, window = 4.0, 1024
    spec = ce.extend_spec(BASE, method, s, window)
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(4 * window, size=64, replace=False))
    x = rng.normal(size=(64, K))
    got = np.asarray(rope.apply(jnp.asarray(x[None, :, None], jnp.float32), jnp.asarray(positions)[None], spec))
    got = got[0, :, 0]
    th = theta64(10_000.0)
    original, interpolated = rotate64(x, positions, th), rotate64(x, positions, th / s)
    wavelength = 2 * math.pi / th
    pairs = {"high": np.flatnonzero(wavelength < window / 32.0), "highest": np.array([0]),
             "all": np.arange(K // 2)}[kept]
    assert len(pairs) > 0
    cols = np.concatenate([pairs, pairs + K // 2])
    np.testing.assert_allclose(got[:, cols], original[:, cols], atol=3e-3)  # float32 angles up to 4e3 rad
    if method == "yarn":
        low_pairs = np.flatnonzero(wavelength > window)  # beyond the window: fully interpolated
        cols = np.concatenate([low_pairs, low_pairs + K // 2])
        np.testing.assert_allclose(got[:, cols], interpolated[:, cols], atol=3e-3)
        assert np.max(np.abs(got[:, cols] - original[:, cols])) > 0.5


def tiny_model(window=C, **kw):
    cfg = presets.get("tiny", max_len=window, n_layers=3, **kw)
    return cfg, llama.init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("method", ["dynamic_ntk", "eabf", "eabf_all"])
def test_logits_below_the_window_are_unchanged(method):
    """Dynamic NTK is plain RoPE while no position passes the window; EABF's scale is 1 for
    i <= c, so its logits equal ABF's there, and differ beyond it."""
    cfg, params = tiny_model()
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 4 * C))
    ext = ce.extended_config(cfg, ce.ContextExtensionConfig(method, 4 * C, abf_base=50_000.0))
    reference_method = "none" if method == "dynamic_ntk" else "abf"
    ref = ce.extended_config(cfg, ce.ContextExtensionConfig(reference_method, 4 * C, abf_base=50_000.0))
    got, want = forward(ext, params, tokens[:, :C]), forward(ref, params, tokens[:, :C])
    np.testing.assert_allclose(got, want, atol=1e-5)
    got_long, want_long = forward(ext, params, tokens), forward(ref, params, tokens)
    if method != "dynamic_ntk":  # dynamic NTK rescales every position once the call passes c
        np.testing.assert_allclose(got_long[:, :C], want_long[:, :C], atol=1e-5)
    assert np.max(np.abs(got_long[:, C:] - want_long[:, C:])) > 1e-3


def test_eabf_scale_is_one_up_to_the_window_and_exempts_layers():
    spec = ce.extend_spec(BASE, "eabf", 4.0, C, abf_base=500_000.0, unscaled_layers=(0, 1))
    positions = jnp.arange(16 * C)[None]
    i = np.arange(1, 16 * C + 1, dtype=np.float64)
    expected = np.maximum(1.0, np.log(i) / np.log(C))
    assert np.all(expected[:C] == 1.0) and expected[C] > 1.0
    for layer in range(4):
        got = np.asarray(rope.query_scale(positions, spec, layer))[0]
        np.testing.assert_allclose(got, np.ones_like(i) if layer in (0, 1) else expected, rtol=1e-6)
    all_layers = ce.extend_spec(BASE, "eabf_all", 4.0, C)
    np.testing.assert_allclose(np.asarray(rope.query_scale(positions, all_layers, 0))[0], expected, rtol=1e-6)


def test_causal_attention_entropy_against_float64():
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(1, 7, 2, 8)), rng.normal(size=(1, 7, 2, 8))
    got = np.asarray(ce.causal_attention_entropy(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)))
    for h in range(2):
        for t in range(7):
            logits = q[0, t, h] @ k[0, :t + 1, h].T
            p = np.exp(logits - logits.max())
            p /= p.sum()
            assert got[0, h, t] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)


def test_eabf_scale_keeps_attention_entropy_near_the_window_value():
    """Random queries/keys under ABF rotations: attention entropy at query position n grows with
    n (≈ ln n); EABF's t(n) = log_c n keeps it closer to its value at n = c, at every length."""
    rng = np.random.default_rng(3)
    abf_spec = ce.extend_spec(BASE, "abf", 16.0, C, abf_base=500_000.0)
    eabf_spec = ce.extend_spec(BASE, "eabf_all", 16.0, C, abf_base=500_000.0)
    keys = jnp.asarray(rng.normal(size=(1, 16 * C, 1, K)) * 1.3, jnp.float32)
    queries = jnp.asarray(rng.normal(size=(1, 16 * C, 1, K)) * 1.3, jnp.float32)
    positions = jnp.arange(16 * C)[None]

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def entropy_at(spec, n, block=32):
        """Mean entropy of the `block` queries ending at position n − 1 over keys 0..their position."""
        q = rope.apply(queries[:, n - block:n], positions[:, n - block:n], spec)
        q = q * (rope.query_scale(positions[:, n - block:n], spec, 2) * K ** -0.5)[:, :, None, None]
        k = rope.apply(keys[:, :n], positions[:, :n], spec)
        mask = (jnp.arange(n)[None, :] <= jnp.arange(n - block, n)[:, None])[None]
        return jnp.mean(ce.causal_attention_entropy(q, k, mask))

    at_window = float(entropy_at(abf_spec, C))
    assert float(entropy_at(eabf_spec, C)) == pytest.approx(at_window, abs=1e-6)  # t = 1 up to c
    for factor in (4, 16):
        unscaled, scaled = float(entropy_at(abf_spec, factor * C)), float(entropy_at(eabf_spec, factor * C))
        assert unscaled - at_window > 0.5 * math.log(factor)  # grows like ln n
        assert abs(scaled - at_window) < 0.5 * abs(unscaled - at_window)


def test_attention_entropy_probe():
    """Uniform attention (query weights zeroed) has entropy ln(i) at 1-based position i in every
    layer; layer 0 of a random EABF model (window 8, so most positions are scaled) matches a
    float64 NumPy recomputation with t(i) = max(1, ln i / ln 8)."""
    cfg, params = tiny_model(rope=rope.entropy_aware_abf(rope.default(16), 10_000.0, 8, unscaled_layers=()))
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 40))
    uniform = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if jax.tree_util.keystr(path).endswith("['q']") else x, params)
    got = np.asarray(ce.attention_entropy(cfg, uniform, tokens))
    np.testing.assert_allclose(got, np.broadcast_to(np.log(np.arange(1, 41)), (3, 40)), atol=1e-5)

    w = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = w["embed"]["embedding"][tokens]
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w["layers_0"]["attn_norm"]["scale"]
    inv = 1.0 / 10_000.0 ** (np.arange(0, 16, 2) / 16)
    pos = np.arange(40, dtype=np.float64)
    rot = lambda v: np.stack([[rotate64(v[b, :, h], pos, inv) for h in range(v.shape[2])] for b in range(2)])
    q = rot(np.einsum("btd,dhk->bthk", x, w["layers_0"]["attn"]["q"]))  # [B, H, T, K]
    k = rot(np.einsum("btd,dgk->btgk", x, w["layers_0"]["attn"]["k"]))
    k = np.repeat(k, cfg.n_heads // cfg.n_kv_heads, axis=1)
    t = np.maximum(1.0, np.log(pos + 1) / np.log(8.0))
    logits = t[:, None] * np.einsum("bhtk,bhsk->bhts", q, k) / np.sqrt(cfg.head_dim)
    logits = np.where(np.tril(np.ones((40, 40), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1).mean(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(ce.attention_entropy(cfg, params, tokens))[0], entropy, atol=1e-4)


def test_sft_scores_only_the_answer_and_takes_the_paper_step_count(tmp_path):
    cfg, params = tiny_model()
    task = lc.RetrievalConfig(n_pairs=2, answer_len=2)
    s = lc.retrieval_samples(np.random.default_rng(5), 8, 2 * C, task)
    ext = ce.extended_config(cfg, ce.ContextExtensionConfig("pi", 2 * C))
    data = {"tokens": s["tokens"], "loss_mask": s["answer_mask"]}
    _, losses = ce.sft(params, ext, data, ce.SFTConfig(batch_size=8, epochs=1, learning_rate=1e-3), tmp_path / "one")
    logits = np.asarray(forward(ext, params, s["tokens"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, :-1], s["tokens"][:, 1:, None], -1)[..., 0]
    expected = -(picked * s["answer_mask"][:, 1:]).sum() / s["answer_mask"].sum()
    assert losses == [pytest.approx(expected, rel=1e-5)]

    hundred = {k: np.concatenate([v] * 13)[:100] for k, v in data.items()}
    _, losses = ce.sft(params, ext, hundred, ce.SFTConfig(batch_size=32, epochs=2, learning_rate=1e-3),
                       tmp_path / "paper")
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_retrieval_hits_is_greedy_exact_match():
    """Answers rewritten to the model's own sequential greedy choices are all hits; corrupting the
    last answer token of the last query makes exactly that query a miss."""
    cfg, params = tiny_model()
    task = lc.RetrievalConfig(n_pairs=2, answer_len=2, n_queries=2)
    s = lc.retrieval_samples(np.random.default_rng(8), 5, C, task)
    tokens = s["tokens"].copy()
    for p in np.sort(s["answer_positions"][0].ravel()):
        tokens[:, p] = np.argmax(np.asarray(forward(cfg, params, tokens))[:, p - 1], axis=-1)
    greedy = dict(s, tokens=tokens)
    np.testing.assert_array_equal(ce.retrieval_hits(cfg, params, greedy, batch_size=2), np.ones((5, 2), bool))
    last = s["answer_positions"][0, -1, -1]
    tokens[[0, 3], last] = (tokens[[0, 3], last] + 1) % cfg.vocab_size
    expected = np.ones((5, 2), bool)
    expected[[0, 3], 1] = False
    np.testing.assert_array_equal(ce.retrieval_hits(cfg, params, dict(s, tokens=tokens)), expected)


def test_config_validation_names_the_value(tmp_path):
    with pytest.raises(ValueError, match="unknown context-extension method 'rerope'"):
        ce.ContextExtensionConfig("rerope", 256)
    with pytest.raises(ValueError, match="target_len 64 does not extend the pretrained window 64"):
        ce.extended_config(tiny_model()[0], ce.ContextExtensionConfig("abf", 64))
    with pytest.raises(ValueError, match="fine-tuning rows have 300 tokens, the model's max_len is 256"):
        ce.sft({}, presets.get("tiny", max_len=256), {"tokens": np.zeros((2, 300)), "loss_mask": np.zeros((2, 300))},
               ce.SFTConfig(), tmp_path)
    with pytest.raises(ValueError, match="2 fine-tuning samples do not fill one batch of 32"):
        ce.sft({}, presets.get("tiny", max_len=256), {"tokens": np.zeros((2, 30)), "loss_mask": np.zeros((2, 30))},
               ce.SFTConfig(), tmp_path)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """The recipe through the launch entry point: a tiny model saved as a jaxllm model dir,
    extended 64 → 256 with EABF (all layers) on retrieval samples, saved and exported to HF."""
    from launch import extend_context as launch

    root = tmp_path_factory.mktemp("ctx")
    cfg, params = tiny_model(rope=rope.default(16, 400.0))
    model_dir.save_model(root / "base", cfg, params)
    config = launch.get_config()
    config.method, config.target_len, config.abf_base = "eabf_all", 4 * C, 20_000.0
    config.sft.batch_size, config.sft.epochs, config.sft.learning_rate = 4, 1, 1e-3
    config.data.n_samples, config.data.filler = 8, "random"
    new_cfg, new_params, losses = launch.run(config, str(root / "base"), str(root / "out"), export_hf=True)
    return root, cfg, params, new_cfg, new_params, losses


def test_recipe_runs_and_the_saved_model_restores_the_extended_one(extended):
    root, cfg, params, new_cfg, new_params, losses = extended
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert new_cfg.max_len == 4 * C
    assert new_cfg.rope == ce.extend_spec(cfg.rope, "eabf_all", 4.0, C, abf_base=20_000.0)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new_params)
    assert all(jax.tree.leaves(changed))

    saved = json.loads((root / "out" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_theta"] == 20_000.0
    assert saved["jaxllm_logit_scale"] == {"kind": "log_window", "value": 1.0, "window": C, "unscaled_layers": []}
    loaded_cfg, loaded = model_dir.load_model(root / "out")
    assert loaded_cfg.max_len == 4 * C
    for field in ("inv_freq", "logit_scale", "unscaled_layers", "dynamic"):
        assert getattr(loaded_cfg.rope, field) == getattr(new_cfg.rope, field)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 4 * C))
    np.testing.assert_array_equal(forward(loaded_cfg, loaded, tokens), forward(new_cfg, new_params, tokens))
    hf_cfg, hf_params = model_dir.load_model(root / "out" / "hf")  # the HF export keeps the jaxllm scale key
    np.testing.assert_allclose(forward(hf_cfg, hf_params, tokens), forward(new_cfg, new_params, tokens),
                               atol=1e-5)


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn", "abf", "eabf_all"])
def test_hf_export_reloads_in_transformers(tmp_path, method):
    """HF-expressible methods give transformers' logits at every position; EABF's logit scale is
    jaxllm-only, so transformers matches it up to the pretrained window (where t = 1)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxllm.model import hf

    cfg, params = tiny_model(rope=rope.default(16, 400.0))
    ext = ce.extended_config(cfg, ce.ContextExtensionConfig(method, 4 * C, abf_base=20_000.0))
    hf.save(str(tmp_path), ext, params)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(1, 4 * C))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(forward(ext, params, tokens))
    scale = np.max(np.abs(theirs))
    if method == "eabf_all":
        assert np.max(np.abs(ours[:, :C] - theirs[:, :C])) / scale < 1e-4
        assert np.max(np.abs(ours[:, C:] - theirs[:, C:])) / scale > 1e-3
    else:
        assert np.max(np.abs(ours - theirs)) / scale < 1e-4
