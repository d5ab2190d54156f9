"""launch/serve.py: JSONL batch generation; the engine loop behind the server; a proxy-tuned triple
served over HTTP and in batch mode returns the library's tokens, and its members are checked by name."""
import io
import json
import os
import queue
import subprocess
import sys
import urllib.request

import jax
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods.proxy_tuning import proxy_engine
from jaxllm.model import hf, llama, model_dir, presets
from jaxllm.serve import ProxyTriple, SamplingParams, api_server
from jaxllm.serve.engine_loop import EngineLoop
from launch import serve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = Tokenizer.default()
CFG = presets.get("tiny", vocab_size=TOKENIZER.vocab_size)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save(str(path), CFG, llama.init_params(CFG, jax.random.key(0)), tokenizer=TOKENIZER)
    return str(path)


@pytest.fixture(scope="module")
def engine(hf_folder):
    config = serve.get_config()
    config.engine.num_blocks, config.engine.max_seqs = 64, 8
    return serve.build_engine(hf_folder, config)


def defaults(**overrides):
    return {**dict(serve.get_config().sampling), **overrides}


def test_jsonl_batch_generation_with_a_bad_line(engine):
    lines = [json.dumps({"prompt": "def add(a, b):"}), json.dumps({"prompt_ids": [1, 5, 99999]}), "not json",
             json.dumps({"prompt_ids": [1, 17, 23], "max_tokens": 3, "temperature": 0.8, "seed": 4, "n": 2})]
    bar = io.StringIO()
    records = serve.generate_jsonl(engine, lines, TOKENIZER, defaults(max_tokens=6), serve.Progress(2, stream=bar))
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert "invalid token id 99999" in records[1]["error"] and "error" in records[2]
    (greedy,) = engine.generate([TOKENIZER.encode("def add(a, b):", bos=True)],
                                SamplingParams(max_tokens=6, stop_tokens=(TOKENIZER.eos_id,)))
    choice = records[0]["choices"][0]
    assert choice["token_ids"] == greedy.tokens and choice["text"] == serve.decode(TOKENIZER, greedy.tokens)
    assert len(records[3]["choices"]) == 2 and all(len(c["token_ids"]) == 3 for c in records[3]["choices"])
    assert "2/2 requests" in bar.getvalue()


@pytest.mark.slow
def test_command_line_batch_mode(hf_folder, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Return the"}) + "\n")
    subprocess.run([sys.executable, "-m", "launch.serve", f"--source={hf_folder}", f"--input={tmp_path / 'in.jsonl'}",
                    f"--output={tmp_path / 'out.jsonl'}", "--config.sampling.max_tokens=4",
                    "--config.engine.num_blocks=64"], cwd=ROOT, check=True, timeout=300)
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert 1 <= len(record["choices"][0]["token_ids"]) <= 4


def test_engine_loop_survives_samples_of_one_request_finishing_in_one_step(engine):
    """n=3 samples of max_tokens tokens all finish in the same step: every sample's events arrive,
    then the completions, and the loop keeps serving; a receiver that raises fails its request
    alone."""
    loop = EngineLoop(engine)
    try:
        for _ in range(2):
            out = queue.Queue()
            loop.submit([1, 17, 23], SamplingParams(max_tokens=4, temperature=1.0, seed=1, n=3), out.put)
            events = []
            while not isinstance(e := out.get(timeout=300), list):
                events.append(e)
            assert sorted((e.sample_index, e.finish_reason) for e in events if e.finish_reason) == \
                [(0, "length"), (1, "length"), (2, "length")]
            assert len(events) == 12 and [c.tokens for c in e] == [
                [x.token for x in events if x.sample_index == j] for j in range(3)]

        def broken(item):
            raise RuntimeError("receiver failed")

        loop.submit([1, 17, 23], SamplingParams(max_tokens=4), broken)
        out = queue.Queue()
        loop.submit([1, 5], SamplingParams(max_tokens=2), out.put)
        while not isinstance(out.get(timeout=300), list):
            pass
        assert loop.alive and not engine.has_unfinished()
    finally:
        loop.close()


# ---- a proxy-tuned triple (--source with --expert, --anti_expert, --alpha) ----------------------
PROXY_ENGINE = dict(token_budget=16, num_blocks=64, max_seqs=8, block_size=8)
BASE_CFG = presets.get("tiny", vocab_size=TOKENIZER.vocab_size, max_len=64)
SMALL_CFG = presets.get("tiny", vocab_size=TOKENIZER.vocab_size, max_len=64, d_model=32, n_layers=1, n_heads=2,
                        n_kv_heads=1, d_ff=64)
PROXY_ALPHA = 1.5


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    """Model directories of a base and two small members (the default tokenizer in each)."""
    root = tmp_path_factory.mktemp("proxy")
    paths, params = {}, {}
    for role, cfg, seed in (("base", BASE_CFG, 0), ("expert", SMALL_CFG, 1), ("anti", SMALL_CFG, 2)):
        params[role] = llama.init_params(cfg, jax.random.key(seed))
        model_dir.save_model(root / role, cfg, params[role], tokenizer=TOKENIZER)
        paths[role] = str(root / role)
    return paths, ProxyTriple(params["base"], params["expert"], params["anti"])


@pytest.fixture(scope="module")
def proxy_served(triple):
    paths, _ = triple
    config = serve.get_config()
    config.engine.update(PROXY_ENGINE)
    tokenizer = serve.load_tokenizer(paths["base"], expert=paths["expert"], anti_expert=paths["anti"])
    engine = serve.build_engine(paths["base"], config, tokenizer, expert=paths["expert"], anti_expert=paths["anti"],
                                alpha=PROXY_ALPHA)
    server = api_server.start_server(lambda: engine, tokenizer, api_server.ServerConfig(model_name="proxy"), port=0)
    server.wait_ready(timeout=600)
    yield engine, server
    server.close()


def test_served_proxy_triple_returns_the_library_tokens(triple, proxy_served):
    _, params = triple
    engine, server = proxy_served
    texts = ["def add(a, b):", "Return the"]
    prompts = [TOKENIZER.encode(t, bos=True) for t in texts]
    sampling = SamplingParams(max_tokens=6, stop_tokens=(TOKENIZER.eos_id,))
    # The library call the launcher must agree with: proxy_engine on the in-memory params.
    library = proxy_engine(ProxyTriple(BASE_CFG, SMALL_CFG, SMALL_CFG), params, PROXY_ALPHA, **PROXY_ENGINE)
    want = library.generate(prompts, sampling)
    want_tokens, want_logprobs = [c.tokens for c in want], [c.logprobs for c in want]
    library.set_params(ProxyTriple(params.base, params.expert, params.expert))  # expert == anti: the base alone
    assert [c.tokens for c in library.generate(prompts, sampling)] != want_tokens  # the members steer the base

    # HTTP: the OpenAI completions endpoint of the launcher's engine
    for text, tokens, logprobs in zip(texts, want_tokens, want_logprobs):
        body = json.dumps({"model": "proxy", "prompt": text, "max_tokens": 6, "temperature": 0, "logprobs": 0})
        request = urllib.request.Request(f"{server.url}/v1/completions", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as resp:
            choice = json.loads(resp.read())["choices"][0]
        assert choice["text"] == serve.decode(TOKENIZER, tokens)
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], logprobs, atol=2e-5)

    # Batch mode: the JSONL path of the launcher, on the same engine (between server passes)
    with server.state.loop.paused() as paused:
        records = serve.generate_jsonl(paused, [json.dumps({"prompt": t}) for t in texts], TOKENIZER,
                                       defaults(max_tokens=6), serve.Progress(2, stream=io.StringIO()))
    assert [r["choices"][0]["token_ids"] for r in records] == want_tokens


def test_proxy_members_are_checked_by_name(triple, tmp_path):
    paths, params = triple
    config = serve.get_config()
    with pytest.raises(FileNotFoundError, match=r"proxy expert checkpoint '.*/nowhere'"):
        serve.build_engine(paths["base"], config, expert=str(tmp_path / "nowhere"), anti_expert=paths["anti"])
    with pytest.raises(FileNotFoundError, match=r"proxy anti_expert checkpoint '.*/gone'"):
        serve.load_tokenizer(paths["base"], expert=paths["expert"], anti_expert=str(tmp_path / "gone"))
    model_dir.save_model(tmp_path / "bare", SMALL_CFG, params.expert)  # a model dir saved without its tokenizer
    with pytest.raises(FileNotFoundError, match=r"proxy expert '.*/bare' carries no tokenizer"):
        serve.load_tokenizer(paths["base"], expert=str(tmp_path / "bare"), anti_expert=paths["anti"])
    assert serve.load_tokenizer(paths["base"], paths["base"] + "/tokenizer.model", expert=str(tmp_path / "bare"),
                                anti_expert=paths["anti"]).vocab_size == TOKENIZER.vocab_size
    with pytest.raises(ValueError, match="both an expert and an anti_expert"):
        serve.build_engine(paths["base"], config, expert=paths["expert"])
    with pytest.raises(ValueError, match="alpha must be a finite number, got nan"):
        serve.build_engine(paths["base"], config, expert=paths["expert"], anti_expert=paths["anti"],
                           alpha=float("nan"))

    # An expert whose tokenizer swaps two pieces: the first differing id is named.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(TOKENIZER.model_proto)
    proto.pieces[1000].piece, proto.pieces[1500].piece = proto.pieces[1500].piece, proto.pieces[1000].piece
    other = Tokenizer(proto.SerializeToString())
    model_dir.save_model(tmp_path / "expert2", SMALL_CFG, params.expert, tokenizer=other)
    first = next(i for i in range(TOKENIZER.vocab_size) if other.id_to_piece(i) != TOKENIZER.id_to_piece(i))
    assert first == 1000
    with pytest.raises(ValueError, match=f"token id {first} is .* for the expert"):
        serve.load_tokenizer(paths["base"], expert=str(tmp_path / "expert2"), anti_expert=paths["anti"])
