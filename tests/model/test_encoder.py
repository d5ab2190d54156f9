"""BERT encoder: last-hidden-state parity with HF BertModel (torch) and load_bert's error reports."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxllm.model import encoder, hf_bert

torch = pytest.importorskip("torch", reason="the test extra (torch==2.13.0) is not installed")
transformers = pytest.importorskip("transformers", reason="the test extra (transformers) is not installed")

HF_KW = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
             max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12)


def save_random_bert(path, cls_name="BertModel", seed=0, **overrides):
    """A random HF BERT saved to `path`, every parameter perturbed (HF initialises biases to 0 and
    LayerNorm to 1, which would hide swapped or missing biases/norms)."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**{**HF_KW, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    return path, save_random_bert(path)


def inputs(B=3, T=12, V=101, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    types = np.zeros((B, T), np.int64)
    types[0, 6:] = 1
    types[1, 4:7] = 1
    return tokens, mask, types


def forward(cfg, params, tokens, mask, types):
    return np.asarray(jax.jit(encoder.BertEncoder(cfg).apply)({"params": params}, tokens, mask, types))


def test_last_hidden_state_matches_hf_bert(bert_dir):
    path, model = bert_dir
    cfg, params = hf_bert.load_bert(path)
    tokens, mask, types = inputs()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    ours = forward(cfg, params, tokens, mask, types)
    np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=2e-5, rtol=0)


def test_loaded_tree_is_the_init_tree(bert_dir):
    cfg, params = hf_bert.load_bert(bert_dir[0])
    expected = jax.eval_shape(lambda: encoder.init_params(cfg, jax.random.key(0)))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, expected)


def test_task_head_checkpoint_loads_its_bert_trunk(tmp_path):
    model = save_random_bert(tmp_path, "BertForMaskedLM", seed=1)
    cfg, params = hf_bert.load_bert(tmp_path)
    tokens, mask, types = inputs(seed=1)
    with torch.no_grad():
        ref = model.bert(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    ours = forward(cfg, params, tokens, mask, types)
    np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=2e-5, rtol=0)


def test_mean_pooling_ignores_padding(bert_dir):
    cfg, params = hf_bert.load_bert(bert_dir[0])
    tokens, mask, _ = inputs()
    embed = jax.jit(encoder.embed, static_argnames="cfg")
    short = embed(params, tokens[:, :8], mask[:, :8], cfg)
    padded = embed(params, np.pad(tokens[:, :8], ((0, 0), (0, 8))), np.pad(mask[:, :8], ((0, 0), (0, 8))), cfg)
    np.testing.assert_allclose(np.asarray(short), np.asarray(padded), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(short), axis=-1), 1.0, atol=1e-6)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_and_mismatched_tensors_are_named(bert_dir, tmp_path):
    path = copy_checkpoint(bert_dir[0], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["encoder.layer.1.attention.self.key.bias"]
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((81, 48), np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        hf_bert.load_bert(path)
    msg = str(err.value)
    assert "missing tensor 'encoder.layer.1.attention.self.key.bias' (expected shape (48,))" in msg
    assert "'encoder.layer.0.intermediate.dense.weight' has shape (81, 48), expected (80, 48)" in msg


def test_extra_layers_are_unexpected(bert_dir, tmp_path):
    path = copy_checkpoint(bert_dir[0], tmp_path / "ckpt")
    edit_config(path, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.layer\.1\."):
        hf_bert.load_bert(path)


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="roberta"), "unsupported architecture: model_type='roberta'"),
    (dict(hidden_act="relu"), "unsupported hidden_act='relu'"),
    (dict(position_embedding_type="relative_key"), "unsupported position_embedding_type='relative_key'"),
])
def test_unsupported_architecture(bert_dir, tmp_path, changes, match):
    path = copy_checkpoint(bert_dir[0], tmp_path / "ckpt")
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=match):
        hf_bert.load_bert(path)


def test_missing_files(bert_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_bert.load_bert(tmp_path)
    shutil.copy(bert_dir[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_bert.load_bert(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible"):
        encoder.BertConfig(vocab_size=10, d_model=30, n_layers=1, n_heads=4, d_ff=8)
    cfg = encoder.BertConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=8, max_len=4)
    with pytest.raises(ValueError, match="exceeds the encoder's max_len 4"):
        encoder.BertEncoder(cfg).init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32))
