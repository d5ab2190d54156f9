"""RoPE family: entropy-aware ABF scale against float64 NumPy, closed forms, HF round trips."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import rope

BASE = rope.default(128)


def eabf_scale_reference(positions, window, layer, unscaled):
    """float64 NumPy transcription of t(i) = max(1, ln i / ln c), i = position + 1."""
    if layer in unscaled:
        return np.ones(positions.shape)
    return np.maximum(1.0, np.log(positions.astype(np.float64) + 1.0) / np.log(float(window)))


@pytest.mark.parametrize("layer", [0, 1, 2, 5])
def test_eabf_query_scale_matches_float64_reference(layer):
    spec = rope.entropy_aware_abf(BASE, pretrained_window=4096, unscaled_layers=(0, 1))
    positions = np.array([[0, 1, 4094, 4095, 4096, 8191, 16383, 32767, 4096 ** 2 - 1]])
    got = np.asarray(rope.query_scale(jnp.asarray(positions), spec, jnp.asarray(layer)))
    np.testing.assert_allclose(got, eabf_scale_reference(positions, 4096, layer, (0, 1)), rtol=1e-6)


def test_eabf_closed_form_values():
    spec = rope.entropy_aware_abf(BASE, pretrained_window=4096, unscaled_layers=())
    t = lambda i: float(rope.query_scale(jnp.asarray([[i - 1]]), spec, 3)[0, 0])  # 1-based i
    assert t(4096) == 1.0 and t(100) == 1.0
    assert t(8192) == pytest.approx(13 / 12, rel=1e-6)
    assert t(4096 ** 2) == pytest.approx(2.0, rel=1e-6)
    scales = np.asarray(rope.query_scale(jnp.arange(1, 70000)[None], spec, 2))[0]
    assert np.all(np.diff(scales) >= 0)


def test_eabf_frequencies_are_abf_and_identity_limit():
    eabf = rope.entropy_aware_abf(BASE, base=500_000.0)
    assert eabf.inv_freq == rope.abf(BASE, 500_000.0).inv_freq
    same = rope.entropy_aware_abf(BASE, base=10_000.0, pretrained_window=10 ** 9)
    positions = jnp.arange(5000)[None]
    assert same.inv_freq == BASE.inv_freq
    np.testing.assert_array_equal(rope.query_scale(positions, same, 4), np.ones((1, 5000)))


def test_closed_forms_of_other_transforms():
    ntk = rope.ntk(BASE, 4.0)
    assert ntk.base == pytest.approx(10_000 * 4 ** (128 / 126))
    assert ntk.base == pytest.approx(40_889.9, abs=0.1)
    y = rope.yarn(BASE, 4.0, 4096)
    assert y.logit_scale.kind == "constant" and y.logit_scale.value == pytest.approx(1.29648, abs=1e-5)
    pi = rope.linear(BASE, 4.0)
    np.testing.assert_allclose(pi.inv_freq, np.asarray(BASE.inv_freq) / 4, rtol=1e-6)


def test_pi_equals_dividing_positions():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 2, 128)), jnp.float32)
    pos = jnp.arange(0, 24, 4)[None]
    np.testing.assert_allclose(rope.apply(x, pos, rope.linear(BASE, 4.0)), rope.apply(x, pos // 4, BASE),
                               atol=1e-5)


def test_yarn_keeps_high_frequencies_and_interpolates_low():
    y = rope.yarn(BASE, 4.0, 4096)
    assert y.inv_freq[0] == BASE.inv_freq[0]
    assert y.inv_freq[-1] == pytest.approx(BASE.inv_freq[-1] / 4, rel=1e-6)


def test_rotation_against_float64_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8))
    pos = rng.integers(0, 10_000, size=(2, 5))
    spec = rope.default(8, 10_000.0)
    inv = 1.0 / 10_000.0 ** (np.arange(0, 8, 2) / 8)
    ang = pos[..., None, None] * np.concatenate([inv, inv])
    rot = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    ref = x * np.cos(ang) + rot * np.sin(ang)
    got = rope.apply(jnp.asarray(x, jnp.float32), jnp.asarray(pos), spec)
    np.testing.assert_allclose(got, ref, atol=2e-3)  # float32 angles up to 1e4 rad


HF_FORMS = [
    {"rope_theta": 10000.0},
    {"rope_theta": 500000.0, "rope_scaling": None},
    {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 64}},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "beta_fast": 16.0,
                         "beta_slow": 2.0, "original_max_position_embeddings": 128}},
]


@pytest.mark.parametrize("form", HF_FORMS, ids=lambda f: str(f)[:60])
def test_hf_round_trip_every_form(form):
    cfg = dict(form, head_dim=64, max_position_embeddings=256)
    spec = rope.from_hf(cfg)
    assert rope.to_hf(spec) == form
    again = rope.from_hf(dict(rope.to_hf(spec), head_dim=64, max_position_embeddings=256))
    assert again.inv_freq == spec.inv_freq and again.logit_scale == spec.logit_scale


@pytest.mark.parametrize("make", [
    lambda s: rope.linear(s, 4.0), lambda s: rope.yarn(s, 4.0, 64), lambda s: rope.abf(s),
    lambda s: rope.entropy_aware_abf(s, pretrained_window=64), lambda s: rope.entropy_aware_abf(s, unscaled_layers=()),
    lambda s: rope.llama3(s, 8.0, 1.0, 4.0, 64), lambda s: rope.ntk(s, 4.0)])
def test_transformed_specs_survive_hf_export(make):
    spec = make(rope.default(64))
    back = rope.from_hf(dict(rope.to_hf(spec), head_dim=64, max_position_embeddings=256))
    assert back.inv_freq == spec.inv_freq
    assert back.logit_scale == spec.logit_scale and back.unscaled_layers == spec.unscaled_layers


def test_specs_are_hashable_and_validated():
    assert hash(rope.entropy_aware_abf(BASE)) == hash(rope.entropy_aware_abf(BASE))
    with pytest.raises(ValueError, match="unsupported rope type 'longrope'"):
        rope.from_hf({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}, "head_dim": 8})
    with pytest.raises(ValueError, match="factor must be > 0, got -1"):
        rope.linear(BASE, -1.0)
    with pytest.raises(ValueError, match="head_dim must be even, got 7"):
        rope.default(7)
    assert math.isclose(rope.abf(BASE, 123.0).base, 123.0)
