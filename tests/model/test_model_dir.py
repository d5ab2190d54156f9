"""The model format: save_model/load_model round trips for every kind of source, the tokenizer a
source carries, export_hf, and the errors on bad input."""
import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data.hf_tokenizer import HFTokenizer
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import hf, llama, load_model, load_tokenizer, model_dir, presets, record_model, rope, save_model

SPM = Tokenizer.default()
TEXT = "def add(x, y):\n\treturn x + y  # 42 café"


def tiny(**kw):
    cfg = presets.get("tiny", vocab_size=SPM.vocab_size, max_len=64, **kw)
    return cfg, llama.init_params(cfg, jax.random.key(1))


def spec_variants(head_dim=16):
    plain = rope.default(head_dim, 400.0)
    return {"default": plain, "linear": rope.linear(plain, 4.0), "ntk": rope.ntk(plain, 4.0),
            "dynamic": rope.dynamic_ntk(plain, 4.0, 64), "yarn": rope.yarn(plain, 4.0, 64),
            "llama3": rope.llama3(plain, 4.0, original_max_position=64), "abf": rope.abf(plain, 20_000.0),
            "eabf": rope.entropy_aware_abf(plain, 20_000.0, 64, (0,)),
            "from_hf": rope.from_hf({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0},
                                     "head_dim": head_dim, "hidden_size": 64, "num_attention_heads": 4})}


def logits(cfg, params, seed=0):
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(2, 24))
    return np.asarray(llama.forward(cfg, params, tokens))


def assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.mark.parametrize("name", sorted(spec_variants()))
def test_every_config_field_round_trips_through_config_json(name):
    cfg = presets.get("tiny", max_len=96, tie_embeddings=True, scan_layers=True, remat="dots", dtype="bfloat16",
                      norm_eps=1e-6, head_dim=16, rope=spec_variants()[name])
    back = model_dir.config_from_dict(json.loads(json.dumps(model_dir.config_json(cfg)))["jaxllm"]["config"])
    assert back == cfg and hash(back.rope) == hash(cfg.rope)


def test_model_dir_round_trip_with_tokenizer(tmp_path):
    cfg, params = tiny(rope=rope.entropy_aware_abf(rope.default(16, 400.0), 20_000.0, 32, ()))
    save_model(tmp_path / "m", cfg, params, tokenizer=SPM)
    loaded_cfg, loaded = load_model(tmp_path / "m")
    assert loaded_cfg == cfg
    assert_same_params(loaded, params)
    np.testing.assert_array_equal(logits(loaded_cfg, loaded), logits(cfg, params))
    assert load_tokenizer(tmp_path / "m").encode(TEXT) == SPM.encode(TEXT)
    assert model_dir.load_config(tmp_path / "m") == cfg


def test_workdir_source_reads_the_newest_checkpoint_without_being_told_the_config(tmp_path):
    import grain

    from jaxllm.train import checkpoint, state

    cfg, params = tiny(n_layers=3, rope=rope.default(16, 400.0))
    record_model(tmp_path, cfg, SPM)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    for step, p in enumerate([jax.tree.map(lambda x: x * 0, params), params], start=1):
        st = state.init_state(p, optax.adamw(1e-3), jax.random.key(0))
        ckpt.save(dataclasses.replace(st, step=st.step + step), iter(grain.MapDataset.range(4)))
        ckpt.wait()
    ckpt.close()
    for source in (tmp_path, tmp_path / "checkpoints"):
        loaded_cfg, loaded = load_model(source)
        assert loaded_cfg == cfg
        assert_same_params(loaded, params)
    assert load_tokenizer(tmp_path).encode(TEXT) == SPM.encode(TEXT)
    record_model(tmp_path, cfg, SPM)  # the same model again (a resumed run) is fine
    with pytest.raises(ValueError, match="records a different model"):
        record_model(tmp_path, dataclasses.replace(cfg, max_len=32), SPM)


def test_hf_folder_source(tmp_path):
    cfg, params = tiny()
    hf.save(str(tmp_path), cfg, params, tokenizer=SPM)
    loaded_cfg, loaded = load_model(tmp_path)
    np.testing.assert_allclose(logits(loaded_cfg, loaded), logits(cfg, params), atol=1e-6)
    assert isinstance(load_tokenizer(tmp_path), Tokenizer)


def test_bad_sources_raise_errors_naming_the_path(tmp_path):
    cfg, params = tiny()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "old_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="old_run has no config.json .a workdir written before"):
        load_model(tmp_path / "old_run")
    record_model(tmp_path / "no_params", cfg)
    with pytest.raises(FileNotFoundError, match="no_params has neither params/ nor checkpoints/"):
        load_model(tmp_path / "no_params")
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad_json/config.json"):
        load_model(tmp_path / "bad_json")
    save_model(tmp_path / "other", dataclasses.replace(cfg, d_ff=cfg.d_ff * 2), params | {})  # shape mismatch
    with pytest.raises(ValueError, match="other/params"):
        load_model(tmp_path / "other")
    save_model(tmp_path / "corrupt", cfg, params)
    for f in (tmp_path / "corrupt" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="corrupt/params"):
        load_model(tmp_path / "corrupt")
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*empty"):
        load_tokenizer(tmp_path / "empty")


def _byte_level_folder(path):
    """A Llama-3-style tokenizer folder: byte-level BPE tokenizer.json, bos added by its
    post-processor, special tokens named in tokenizer_config.json."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    raw = Raw(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([TEXT * 3, "the quick brown fox jumps over the lazy dog " * 5], trainer)
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    raw.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": specials[0], "eos_token": specials[1], "tokenizer_class": "PreTrainedTokenizerFast"}))


def test_tokenizer_json_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _byte_level_folder(tmp_path / "tok")
    ours = tokenizer_lib.load(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert isinstance(ours, HFTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (theirs.bos_token_id, theirs.eos_token_id, len(theirs))
    text = "the lazy fox returns x + y é"
    assert ours.encode(text, bos=True) == theirs(text)["input_ids"]
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(text, bos=True, eos=True)) == theirs.decode(
        theirs(text)["input_ids"], skip_special_tokens=True) == text
    ids, mask = ours.apply_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id and sum(mask) == len(ours.encode("yo")) + 1
    ours.save(tmp_path / "copy")  # save/load keeps vocabulary and special tokens
    copy = tokenizer_lib.load(tmp_path / "copy")
    assert copy.encode(text, bos=True, eos=True) == ours.encode(text, bos=True, eos=True)


def _workdir(path, cfg, params):
    import grain

    from jaxllm.train import checkpoint, state

    record_model(path, cfg, SPM)
    ckpt = checkpoint.Checkpointer(path / "checkpoints")
    ckpt.save(state.init_state(params, optax.adamw(1e-3), jax.random.key(0)), iter(grain.MapDataset.range(2)))
    ckpt.wait()
    ckpt.close()


def test_export_hf_writes_a_folder_that_loads_back_with_its_tokenizer(tmp_path):
    from launch import export_hf

    cfg, params = tiny(rope=rope.yarn(rope.default(16, 400.0), 2.0, 32))
    _workdir(tmp_path / "run", cfg, params)
    export_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert "jaxllm" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_cfg, hf_params = load_model(tmp_path / "hf")
    np.testing.assert_allclose(logits(hf_cfg, hf_params), logits(cfg, params), atol=1e-6)
    assert load_tokenizer(tmp_path / "hf").encode(TEXT) == SPM.encode(TEXT)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        export_hf.export(str(tmp_path / "run"), str(tmp_path / "hf2"), str(tmp_path / "run" / "checkpoints"))


@pytest.mark.slow  # HF logit parity of hf.save is in the default suite (tests/model/test_hf_parity.py)
def test_export_hf_loads_in_transformers_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from launch import export_hf

    cfg, params = tiny(rope=rope.yarn(rope.default(16, 400.0), 2.0, 32))
    _workdir(tmp_path / "run", cfg, params)
    export_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 24))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(llama.forward(cfg, params, tokens))
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-4
