"""launch/serve.py: JSONL batch generation and the OpenAI-compatible HTTP server on 127.0.0.1."""
import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import jax
import pytest

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import hf, llama, presets
from jaxllm.serve import SamplingParams
from launch import serve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = Tokenizer.default()
CFG = presets.get("tiny", vocab_size=TOKENIZER.vocab_size)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save(str(path), CFG, llama.init_params(CFG, jax.random.key(0)))
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


def _post(url, body, timeout=120):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def test_http_completions_plain_streaming_and_errors(engine):
    loop = serve.EngineLoop(engine)
    server = serve.make_server(loop, TOKENIZER, defaults(), host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        body = {"prompt": "import os", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        with _post(f"{base}/completions", body) as resp:
            plain = json.loads(resp.read())
        (want,) = engine.generate([TOKENIZER.encode("import os", bos=True)], SamplingParams(max_tokens=5))
        choice = plain["choices"][0]
        assert choice["token_ids"] == want.tokens and choice["finish_reason"] == "length"
        assert plain["object"] == "text_completion" and plain["usage"]["completion_tokens"] == 5

        with _post(f"{base}/completions", {**body, "stream": True}) as resp:
            events = [line[len(b"data: "):].strip() for line in resp.read().splitlines() if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert [c["token_ids"][0] for c in chunks] == want.tokens
        assert "".join(c["text"] for c in chunks) == choice["text"] and chunks[-1]["finish_reason"] == "length"

        with pytest.raises(urllib.error.HTTPError) as err:
            _post(f"{base}/completions", {"prompt_ids": [1, 2], "max_tokens": 0})
        assert err.value.code == 400 and "max_tokens" in json.loads(err.value.read())["error"]["message"]
        with urllib.request.urlopen(f"{base}/models", timeout=30) as resp:
            assert json.loads(resp.read())["data"][0]["object"] == "model"
    finally:
        server.shutdown()
        server.server_close()
        loop.close()


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
    the queue ends, and the loop keeps serving the next request."""
    loop = serve.EngineLoop(engine)
    try:
        for _ in range(2):
            _, out = loop.submit([1, 17, 23], SamplingParams(max_tokens=4, temperature=1.0, seed=1, n=3))
            events = []
            while (e := out.get(timeout=120)) is not None:
                events.append(e)
            assert sorted((e.sample_index, e.finish_reason) for e in events if e.finish_reason) == \
                [(0, "length"), (1, "length"), (2, "length")]
            assert len(events) == 12
        assert loop._thread.is_alive()
    finally:
        loop.close()
