"""Logit parity with HF transformers' LlamaForCausalLM (torch, float32) on random weights."""
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the test extra (torch==2.13.0) is not installed")
transformers = pytest.importorskip("transformers", reason="the test extra (transformers) is not installed")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.model import hf, llama, value_head  # noqa: E402

REL_TOL = 1e-4


def make_hf(tmp_path, *, seed=0, **overrides):
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def assert_close(ours, ref):
    err = np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref))
    assert err <= REL_TOL, f"relative error {err:.2e} > {REL_TOL}"


def tokens(B, T, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


CASES = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "odd_head_dim": dict(head_dim=10, num_attention_heads=6, num_key_value_heads=3),
    "rope_theta": dict(rope_theta=500_000.0),
}

ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_architecture_variants_match_hf(tmp_path, case):
    model = make_hf(tmp_path, **CASES[case])
    cfg, params = hf.load(str(tmp_path))
    toks = tokens(2, 24, cfg.vocab_size)
    assert_close(llama.forward(cfg, params, jnp.asarray(toks)), hf_logits(model, toks))


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_types_match_hf_beyond_window(tmp_path, case):
    rope_parameters = {"rope_theta": 10_000.0, **ROPE_CASES[case]}
    model = make_hf(tmp_path, rope_parameters=rope_parameters)
    cfg, params = hf.load(str(tmp_path), max_len=256)
    toks = tokens(1, 160, cfg.vocab_size, seed=1)  # 5x the 32-token original window
    assert_close(llama.forward(cfg, params, jnp.asarray(toks)), hf_logits(model, toks))


def test_export_round_trip_loads_in_hf(tmp_path):
    model = make_hf(tmp_path / "src")
    cfg, params = hf.load(str(tmp_path / "src"))
    hf.save(str(tmp_path / "dst"), cfg, params)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    toks = tokens(2, 20, cfg.vocab_size, seed=2)
    np.testing.assert_array_equal(hf_logits(reloaded, toks), hf_logits(model, toks))


def test_export_of_scanned_sharded_checkpoint(tmp_path):
    """Scanned layers export to per-layer HF names; a small shard limit forces the index format."""
    model = make_hf(tmp_path / "src", rope_parameters={"rope_theta": 10_000.0, "rope_type": "yarn", "factor": 2.0,
                                                       "original_max_position_embeddings": 32})
    cfg, params = hf.load(str(tmp_path / "src"), scan_layers=True, max_len=64)
    hf.save(str(tmp_path / "dst"), cfg, params, max_shard_bytes=20_000)
    assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    cfg2, params2 = hf.load(str(tmp_path / "dst"))
    toks = tokens(1, 48, cfg.vocab_size, seed=3)
    ref = hf_logits(model, toks)
    assert_close(hf_logits(reloaded, toks), ref)
    assert_close(llama.forward(cfg, params, jnp.asarray(toks)), ref)
    assert_close(llama.forward(cfg2, params2, jnp.asarray(toks)), ref)


def test_load_errors_name_the_problem(tmp_path):
    make_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    bad = dict(config, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight.*\(80, 48\).*\(96, 48\)"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    with pytest.raises(ValueError, match="model.layers.2.*missing"):
        hf.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(str(tmp_path / "nowhere"))


def test_export_refuses_a_value_head_instead_of_dropping_it(tmp_path):
    make_hf(tmp_path / "src")
    cfg, params = hf.load(str(tmp_path / "src"))
    cfg_v = dataclasses.replace(cfg, value_head=True)
    params_v = value_head.add_value_head(cfg, params, jax.random.key(0))
    with pytest.raises(ValueError, match="value head.*reft_policy"):
        hf.save(str(tmp_path / "dst"), cfg_v, params_v)
    assert not (tmp_path / "dst").exists()
