"""launch/serve.py: JSONL batch generation; the engine loop behind the server."""
import io
import json
import os
import queue
import subprocess
import sys

import jax
import pytest

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import hf, llama, presets
from jaxllm.serve import SamplingParams
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
