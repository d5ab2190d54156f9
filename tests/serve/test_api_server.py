"""The OpenAI-compatible server through the `openai` client, on a loopback port: completions and
chat (plain and streamed) equal `Engine.generate`, stop strings, n, top log-probs, a streaming
client that leaves, errors with their statuses, /health while loading, /metrics."""
import json
import queue
import threading
import time
import urllib.error
import urllib.request

import jax
import pytest

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import llama, presets
from jaxllm.serve import Engine, SamplingParams
from jaxllm.serve.api_server import ServerConfig, start_server
from jaxllm.serve.engine_loop import EngineLoop, Overloaded, RequestTimeout
from jaxllm.serve.outputs import TokenEvent

openai = pytest.importorskip("openai")

TOKENIZER = Tokenizer.default()
CFG = presets.get("tiny", vocab_size=TOKENIZER.vocab_size, max_len=1024)
PARAMS = llama.init_params(CFG, jax.random.key(0))
ENGINE = dict(token_budget=32, buckets=(16, 32), context_buckets=(), block_size=8, num_blocks=160, max_seqs=8)
KEY = "sekret"


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(model_name="tiny", api_key=KEY, max_body_bytes=32 << 10,
                          defaults={"temperature": 0.0, "max_tokens": 16})
    srv = start_server(lambda: Engine(CFG, PARAMS, tokenizer=TOKENIZER, **ENGINE), TOKENIZER, config,
                       host="127.0.0.1", port=0)
    srv.wait_ready(timeout=900)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def generate(server, prompt, **kwargs):
    """Engine.generate on the server's own engine, between passes."""
    with server.state.loop.paused() as engine:
        return engine.generate([prompt], SamplingParams(stop_tokens=(TOKENIZER.eos_id,), **kwargs))


def metrics(server) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=60) as resp:
        lines = resp.read().decode().splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}


def test_completions_and_chat_equal_engine_generate(server, client):
    prompt = "def add(a, b):"
    want = generate(server, TOKENIZER.encode(prompt, bos=True), max_tokens=8)[0]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.tokens)
    assert got.usage.prompt_tokens == len(TOKENIZER.encode(prompt, bos=True))
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add two numbers."}]
    ids, _ = TOKENIZER.apply_chat(messages, add_generation_prompt=True)
    want = generate(server, ids, max_tokens=10)[0]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == want.finish_reason
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.tokens) and chunks[-1].usage.prompt_tokens == len(ids)


def test_stop_strings_n_and_top_logprobs(server, client):
    prompt = "import numpy as np"
    ids = TOKENIZER.encode(prompt, bos=True)
    plain = generate(server, ids, max_tokens=12)[0]
    stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 2]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == plain.text[:plain.text.find(stop)] and got.choices[0].finish_reason == "stop"

    want = generate(server, ids, max_tokens=6, temperature=1.0, seed=11, n=3, logprobs=2)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=11, n=3,
                                    logprobs=2)
    assert [c.text for c in got.choices] == [c.text for c in want] and [c.index for c in got.choices] == [0, 1, 2]
    for choice, completion in zip(got.choices, want):
        assert choice.logprobs.token_logprobs == pytest.approx(completion.logprobs, abs=1e-6)
        assert [x for top in choice.logprobs.top_logprobs for x in top.values()] == pytest.approx(
            [x for top in completion.top_logprobs for _, x in top], abs=1e-6)

    messages = [{"role": "user", "content": "hi"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3)
    chat_ids, _ = TOKENIZER.apply_chat(messages, add_generation_prompt=True)
    want = generate(server, chat_ids, max_tokens=4, logprobs=3)[0]
    content = got.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(want.logprobs, abs=1e-6)
    assert [t.logprob for c in content for t in c.top_logprobs] == pytest.approx(
        [x for top in want.top_logprobs for _, x in top], abs=1e-6)


def test_streaming_client_that_leaves_is_aborted(server, client):
    before = metrics(server)
    # 1000 tokens: still decoding when the client (which may lag behind the stream) leaves
    stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=1000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 1:
            break
    with server.state.loop.paused():  # the request cannot finish before the server sees the client leave
        stream.close()
        time.sleep(1.0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = metrics(server)
        if now["jaxllm:request_aborts_total"] > before["jaxllm:request_aborts_total"]:
            break
        time.sleep(0.2)
    assert now["jaxllm:request_aborts_total"] == before["jaxllm:request_aborts_total"] + 1
    assert now["jaxllm:num_requests_running"] == 0 and now["jaxllm:num_requests_waiting"] == 0
    assert now["jaxllm:kv_cache_usage_perc"] == 0
    assert now["jaxllm:generation_tokens_total"] - before["jaxllm:generation_tokens_total"] < 1000
    assert now["jaxllm:time_to_first_token_seconds_count"] > before["jaxllm:time_to_first_token_seconds_count"]
    assert not server.state.loop.engine.scheduler.blocks.ref_counts.any()


def test_timeout_and_a_client_that_leaves_a_plain_request_abort_it(server, client):
    """The loop is held (paused) while each request arrives, so neither can finish first. A request
    whose deadline passes while it waits to be submitted is never admitted: it decodes nothing. A
    request whose client left is aborted when the server reads the disconnect, far short of its
    1000 tokens (how many it decodes first depends on the machine's speed)."""
    loop, before = server.state.loop, metrics(server)
    errors = []

    def timed_out():
        try:
            client.completions.create(model="tiny", prompt="Once", max_tokens=100, temperature=0,
                                      extra_body={"ignore_eos": True, "timeout": 0.05})
        except openai.APIStatusError as err:
            errors.append(err.status_code)

    def leaves():
        body = json.dumps({"model": "tiny", "prompt": "Twice", "max_tokens": 1000, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"{server.url}/v1/completions", body,
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        with pytest.raises(OSError):  # the client gives up after 2 s
            urllib.request.urlopen(request, timeout=2)

    thread = threading.Thread(target=timed_out)
    with loop.paused():  # the request's deadline passes while it waits to be submitted
        thread.start()
        time.sleep(1.5)
    thread.join()
    after_timeout = metrics(server)
    assert errors == [408]
    for name in ("jaxllm:prompt_tokens_total", "jaxllm:generation_tokens_total"):
        assert after_timeout[name] == before[name], name
    thread = threading.Thread(target=leaves)
    with loop.paused():  # the client is gone before its request is submitted
        thread.start()
        thread.join()
    # a request the server reads only after its client left may never be submitted; one that is
    # submitted is aborted, not finished
    twice = len(TOKENIZER.encode("Twice", bos=True))

    def settled(now):
        submitted = now["jaxllm:prompt_tokens_total"] - before["jaxllm:prompt_tokens_total"] == twice
        aborted = now["jaxllm:request_aborts_total"] - before["jaxllm:request_aborts_total"]
        return aborted == submitted and now["jaxllm:num_requests_running"] + now["jaxllm:num_requests_waiting"] == 0

    deadline = time.monotonic() + 120
    while not settled(now := metrics(server)):
        assert time.monotonic() < deadline, (before, now)
        time.sleep(0.1)
    assert now["jaxllm:kv_cache_usage_perc"] == 0
    assert now["jaxllm:generation_tokens_total"] - before["jaxllm:generation_tokens_total"] < 1000


def test_the_loop_times_out_a_running_request_and_refuses_an_expired_one():
    engine = Engine(CFG, PARAMS, tokenizer=TOKENIZER, **ENGINE)
    loop = EngineLoop(engine)
    try:
        with pytest.raises(RequestTimeout, match="before it was admitted"):
            loop.submit([1, 5, 7], SamplingParams(max_tokens=4), lambda item: None, deadline=time.monotonic())
        assert not engine.has_unfinished()
        out = queue.Queue()
        loop.submit([1, 5, 7], SamplingParams(max_tokens=1000), out.put,
                    deadline=time.monotonic() + 0.1)
        tokens = 0
        while isinstance(item := out.get(timeout=60), TokenEvent):
            tokens += 1
        assert isinstance(item, RequestTimeout) and tokens < 1000, (item, tokens)
        time.sleep(0.2)
        assert out.empty() and loop.metrics.aborts._value.get() == 1
        with loop.paused():
            assert not engine.has_unfinished() and not engine.scheduler.blocks.ref_counts.any()
    finally:
        loop.close()


def test_a_full_waiting_queue_answers_503_at_once(server):
    engine = Engine(CFG, PARAMS, tokenizer=TOKENIZER, **ENGINE)
    loop = EngineLoop(engine, max_waiting=2)
    loop.close()  # nothing steps: submitted requests stay waiting
    ids = [loop.submit([1, 5, 7], SamplingParams(max_tokens=4), lambda item: None) for _ in range(2)]
    with pytest.raises(Overloaded, match="2 requests are waiting"):
        loop.submit([1, 5, 7], SamplingParams(max_tokens=4), lambda item: None)
    assert all(loop.abort(i) for i in ids) and not engine.has_unfinished()
    server.state.loop.max_waiting, limit = 0, server.state.loop.max_waiting
    try:
        code, error = post(server, "/v1/completions", json.dumps({"prompt": "x"}).encode())
    finally:
        server.state.loop.max_waiting = limit
    assert code == 503 and "overloaded" in error["error"]["message"]


def test_echo_scores_the_prompt_and_best_of_keeps_the_likeliest(server, client):
    prompt = "def add(a, b):"
    ids = TOKENIZER.encode(prompt, bos=True)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    with server.state.loop.paused() as engine:
        want = engine.prompt_logprobs(ids, 2)
    choice = got.choices[0]
    assert choice.text == TOKENIZER.decode(ids) and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([x for x, _ in want], abs=1e-5)
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens == len(ids)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.0, seed=3, n=2,
                                    best_of=4)
    want = generate(server, ids, max_tokens=5, temperature=1.0, seed=3, n=2, best_of=4)
    assert [c.text for c in got.choices] == [c.text for c in want]


def post(server, path, data: bytes, key=KEY):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{server.url}{path}", data, headers), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "tiny", "prompt": "x",', 400, None),  # malformed JSON
    (b'[1, 2]', 400, None),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokenz": 3}).encode(), 400, "max_tokenz"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "3"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 5}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": [1, 99999]}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x " * 1100}).encode(), 400, "prompt"),  # longer than the context
    (json.dumps({"model": "tiny", "prompt": "x", "logit_bias": {"a": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": True, "best_of": 3}).encode(), 400, "best_of"),
    (json.dumps({"model": "gpt-5", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "tiny", "prompt": "x" * (40 << 10)}).encode(), 413, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, error = post(server, "/v1/completions", body)
    assert code == status and error["error"]["code"] == status and error["error"]["param"] == param
    assert error["error"]["message"]


def test_auth_unknown_model_and_models_through_the_client(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert post(server, "/v1/chat/completions", b"{}", key=None)[0] == 401
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_health_is_loading_until_the_engine_is_ready():
    gate = threading.Event()
    srv = start_server(lambda: gate.wait() and Engine(CFG, PARAMS, tokenizer=TOKENIZER, **ENGINE), TOKENIZER,
                       ServerConfig(model_name="tiny"), host="127.0.0.1", port=0, precompile=False)
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{srv.url}/health", timeout=60)
        assert err.value.code == 503 and json.loads(err.value.read()) == {"status": "loading"}
        assert post(srv, "/v1/completions", json.dumps({"prompt": "x"}).encode(), key=None)[0] == 503
        gate.set()
        srv.wait_ready(timeout=120)
        with urllib.request.urlopen(f"{srv.url}/health", timeout=60) as resp:
            assert resp.status == 200
    finally:
        gate.set()
        srv.close()
