r"""Serving soak: the OpenAI-compatible HTTP server under mixed and hostile traffic.

  nice -n 10 python benchmarks/soak.py [--requests=2000 --duration=300 --clients=8 --seed=0]

`jaxllm.serve.api_server.start_server` serves a random-weight `tiny` Llama (2 layers, d_model 64,
the default tokenizer's vocabulary, a 256-token context) in this process. `--clients` threads
send requests over fresh HTTP connections until at least `--requests` have been sent and
`--duration` seconds have passed. About 90 % are well formed: /v1/completions or
/v1/chat/completions, streamed or not, greedy or seeded sampling (temperature 0.8, top-p 0.95),
16 prompts of 1 to ~100 tokens, max_tokens 1 to 64 (few enough distinct requests that each
gets its reference). About 10 % are hostile, each with the answer it
must get: malformed JSON, a non-object body, wrong types, an unknown field, a negative
max_tokens, an out-of-range temperature, an unknown token id or model, a bad chat role (400/404);
a prompt longer than the context (400); bodies over the server's limit, with and without a
Content-Length (413); a request past its `timeout` (408, or a 408 error event once the stream
started); a huge max_tokens (capped to the context: 200 with at most the context's room);
streaming clients that leave after two events and plain clients that give up after 0.3 s (no
answer expected: their requests must be aborted).

Checks: every well-formed request answers 200; a greedy one with the text and finish reason of
`Engine.generate` on the same prompt alone, run afterwards on a separate Engine with the same
weights (seeded sampled ones are compared too, and their divergences counted apart: see
`check_outputs`); every hostile one gets its status; /health answers 200 throughout
(polled every second); at the end /metrics shows no running or waiting request and no held KV
block (kv_cache_usage_perc 0), and the engine holds no block. Reported: requests served /
hostile / failed, latency and time-to-first-token percentiles (client side), resident memory
(of this process: server and clients) after warm-up, at the end and its peak, and the server's
own counters. Results: stdout and `benchmarks/results/soak.json`; `tests/reliability/test_soak.py`
runs a short version of `soak()`.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import random
import threading
import time

import jax
import numpy as np

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import llama, presets
from jaxllm.serve import Engine, SamplingParams
from jaxllm.serve.api_server import ServerConfig, start_server

CONTEXT = 256
ENGINE = dict(token_budget=64, buckets=(16, 32, 64), context_buckets=(), block_size=16, num_blocks=256, max_seqs=16)
MAX_BODY = 32 << 10
MAX_TOKENS = (1, 4, 16, 32, 64)
SEEDS = (0, 1)
HOSTILE = ("malformed_json", "not_an_object", "wrong_type", "unknown_field", "negative_max_tokens",
           "bad_temperature", "bad_token_id", "unknown_model", "bad_role", "prompt_too_long", "oversized_body",
           "oversized_chunked", "timeout", "huge_max_tokens", "disconnect_stream", "disconnect_plain")


def prompt_pool(n: int, seed: int) -> list[str]:
    """`n` prompts of 1 to 70 words cut from a standard-library module's source."""
    words = pathlib.Path(json.__file__).with_name("decoder.py").read_text().split()
    rng = random.Random(seed)
    pool = []
    for i in range(n):
        length = (1, 4, 12, 30, 70)[i % 5]
        start = rng.randrange(len(words) - length)
        pool.append(" ".join(words[start:start + length]))
    return pool


def make_request(rng: random.Random, pool: list[str], hostile: str | None) -> dict:
    """One request: path, body (bytes or a chunk iterator), what it expects, and for a well-formed
    one the prompt (text or chat messages) and sampling settings to reproduce it."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    text = rng.choice(pool)
    body = {"model": "soak", "max_tokens": rng.choice(MAX_TOKENS), "stream": rng.random() < 0.5}
    if chat:
        body["messages"] = ([{"role": "system", "content": "Be brief."}] if rng.random() < 0.5 else []) + [
            {"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if rng.random() < 0.5:
        body.update(temperature=0.0)
    else:
        body.update(temperature=0.8, top_p=0.95, seed=rng.choice(SEEDS))
    req = {"kind": hostile or "ok", "path": path, "chat": chat, "stream": body["stream"], "expect": 200}
    if hostile is None:
        return {**req, "body": body, "data": json.dumps(body).encode()}
    long_run = {"max_tokens": CONTEXT, "ignore_eos": True, "temperature": 0.0}
    data = None
    if hostile == "malformed_json":
        data, req["expect"] = json.dumps(body).encode()[:-rng.randint(1, 5)], 400
    elif hostile == "not_an_object":
        data, req["expect"] = rng.choice([b"[1, 2]", b'"prompt"', b"null", b"42"]), 400
    elif hostile == "wrong_type":
        body[rng.choice(["max_tokens", "temperature", "stream"])] = rng.choice(["3", [1], {"a": 1}])
        req["expect"] = 400
    elif hostile == "unknown_field":
        body["max_tokenz"], req["expect"] = 3, 400
    elif hostile == "negative_max_tokens":
        body["max_tokens"], req["expect"] = -rng.randint(1, 10**6), 400
    elif hostile == "bad_temperature":
        body["temperature"], req["expect"] = rng.choice([-1.0, 5.0, 1e9]), 400
    elif hostile == "bad_token_id":
        body.pop("messages", None)
        body["prompt"], req["path"], req["expect"] = [1, 10**6], "/v1/completions", 400
    elif hostile == "unknown_model":
        body["model"], req["expect"] = "gpt-5", 404
    elif hostile == "bad_role":
        body.pop("prompt", None)
        body["messages"], req["path"], req["expect"] = [{"role": "robot", "content": text}], "/v1/chat/completions", 400
    elif hostile == "prompt_too_long":
        body.pop("messages", None)
        body["prompt"], req["path"], req["expect"] = "x " * rng.randint(CONTEXT, 4 * CONTEXT), "/v1/completions", 400
    elif hostile == "oversized_body":
        body.pop("messages", None)
        body["prompt"], req["path"], req["expect"] = "x" * rng.randint(MAX_BODY, 4 * MAX_BODY), "/v1/completions", 413
    elif hostile == "oversized_chunked":
        blob = json.dumps({**body, "padding": "x" * 4 * MAX_BODY}).encode()
        data, req["expect"] = (blob[i:i + 8192] for i in range(0, len(blob), 8192)), 413
    elif hostile == "timeout":
        body.update(long_run, timeout=rng.uniform(0.01, 0.1))
        req["expect"] = 408
    elif hostile == "huge_max_tokens":
        body.update(max_tokens=rng.choice([10**6, 2**63, 10**30]), stream=False)
        req.update(expect=200, stream=False)
    elif hostile in ("disconnect_stream", "disconnect_plain"):
        body.update(long_run, stream=hostile == "disconnect_stream")
        req.update(expect=None, stream=body["stream"])
    return {**req, "body": body, "data": data if data is not None else json.dumps(body).encode()}


def send(url: str, req: dict) -> dict:
    """Send one request; returns {status, text, finish_reason, completion_tokens, latency, ttft,
    error} as seen by the client."""
    host, port = url.removeprefix("http://").split(":")
    leave_after = 0.3 if req["kind"] == "disconnect_plain" else 300
    conn = http.client.HTTPConnection(host, int(port), timeout=leave_after)
    start = time.perf_counter()
    out = {"status": None, "text": "", "finish_reason": None, "ttft": None, "error": None}
    try:
        chunked = not isinstance(req["data"], bytes)
        conn.request("POST", req["path"], req["data"], {"Content-Type": "application/json"}, encode_chunked=chunked)
        resp = conn.getresponse()
        out["status"] = resp.status
        if resp.status != 200 or not req["stream"]:
            payload = json.loads(resp.read())
            if resp.status == 200:
                choice = payload["choices"][0]
                out["text"] = choice["message"]["content"] if req["chat"] else choice["text"]
                out["finish_reason"] = choice["finish_reason"]
                out["completion_tokens"] = payload["usage"]["completion_tokens"]
            else:
                out["error"] = payload["error"]
        else:
            events = 0
            while line := resp.readline():
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["error"], out["status"] = event["error"], event["error"]["code"]
                    continue
                choice = event["choices"][0]
                piece = (choice["delta"].get("content") or "") if req["chat"] else choice["text"]
                if out["ttft"] is None and (piece or choice["finish_reason"]):
                    out["ttft"] = time.perf_counter() - start
                out["text"] += piece
                out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
                events += 1
                if req["kind"] == "disconnect_stream" and events == 2:
                    break
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as err:
        out["error"] = f"{type(err).__name__}: {err}"  # a broken answer: judged as a failure
    finally:
        conn.close()
    out["latency"] = time.perf_counter() - start
    return out


def judge(req: dict, got: dict) -> str | None:
    """Why the answer is wrong (None if it is what the request must get; outputs of well-formed
    requests are compared with the references later)."""
    if req["expect"] is None:
        return None  # the client left; the server must clean up (checked at the end)
    if got["status"] != req["expect"]:
        return f"status {got['status']} (expected {req['expect']}): {got['error']}"
    if req["expect"] == 200 and got["finish_reason"] is None:
        return "no finish_reason"
    if req["kind"] == "huge_max_tokens" and got["completion_tokens"] > CONTEXT:
        return f"{got['completion_tokens']} tokens exceed the context"
    if req["expect"] != 200 and not (got["error"] or {}).get("message"):
        return "no error message"
    return None


def reference_key(req: dict, tokenizer: Tokenizer) -> tuple:
    """(prompt ids, SamplingParams) the server runs for a well-formed request."""
    body = req["body"]
    if req["chat"]:
        ids = tokenizer.apply_chat(body["messages"], add_generation_prompt=True)[0]
    else:
        ids = tokenizer.encode(body["prompt"], bos=True)
    params = SamplingParams(max_tokens=min(body["max_tokens"], CONTEXT - len(ids)),
                            temperature=body["temperature"], top_p=body.get("top_p", 1.0), seed=body.get("seed", 0),
                            stop_tokens=(tokenizer.eos_id,))
    return tuple(ids), params


def metrics(url: str) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", "/metrics")
        lines = conn.getresponse().read().decode().splitlines()
    finally:
        conn.close()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}


def rss_mib() -> float:
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Monitor(threading.Thread):
    """Polls /health every second (counting answers other than 200) and samples RSS."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.unhealthy, self.polls, self.rss = url, threading.Event(), [], 0, []

    def run(self):
        host, port = self.url.removeprefix("http://").split(":")
        while not self.stop.wait(1.0):
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request("GET", "/health")
                status = conn.getresponse().status
            except (OSError, http.client.HTTPException) as err:
                status = f"{type(err).__name__}: {err}"
            finally:
                conn.close()
            self.polls += 1
            if status != 200:
                self.unhealthy.append(status)
            self.rss.append((time.perf_counter(), rss_mib()))


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)} | {"max": float(max(xs)), "n": len(xs)}


def soak(*, requests: int = 2000, duration: float = 300.0, clients: int = 8, hostile_frac: float = 0.1,
         seed: int = 0, warmup: int = 20) -> dict:
    """Run the soak; returns its figures and every failure (`failures`, empty when all passed)."""
    tokenizer = Tokenizer.default()
    cfg = presets.get("tiny", vocab_size=tokenizer.vocab_size, max_len=CONTEXT)
    params = llama.init_params(cfg, jax.random.key(seed))
    config = ServerConfig(model_name="soak", max_body_bytes=MAX_BODY, max_waiting=1024)
    server = start_server(lambda: Engine(cfg, params, tokenizer=tokenizer, **ENGINE), tokenizer, config, port=0)
    pool = prompt_pool(16, seed)
    records, lock = [], threading.Lock()
    t0 = time.perf_counter()
    try:
        server.wait_ready(timeout=900)
        load_seconds = time.perf_counter() - t0
        for i in range(warmup):  # one of each shape before RSS is first read
            send(server.url, make_request(random.Random(-1 - i), pool, None))
        monitor = Monitor(server.url)
        monitor.start()
        start = time.perf_counter()
        rss_start = rss_mib()

        def client(i: int):
            rng = random.Random(seed * 1000 + i)
            while True:
                with lock:
                    if len(records) >= requests and time.perf_counter() - start >= duration:
                        return
                    records.append(None)
                    slot = len(records) - 1
                hostile = rng.choice(HOSTILE) if rng.random() < hostile_frac else None
                req = make_request(rng, pool, hostile)
                got = send(server.url, req)
                records[slot] = (req, got, judge(req, got))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        settled = settle(server)
        monitor.stop.set()
        monitor.join()
        rss_end = rss_mib()
        with server.state.loop.paused() as engine:
            held_blocks = int((engine.scheduler.blocks.ref_counts > 0).sum())
            unfinished = engine.has_unfinished()
        alive = server.state.loop.alive
    finally:
        server.close()
    failures = [{"kind": r["kind"], "body": r["body"], "why": why} for r, _, why in records if why]
    t0 = time.perf_counter()
    diverged = []
    references = check_outputs([(r, g) for r, g, why in records if r["kind"] == "ok" and not why], cfg, params,
                               tokenizer, failures, diverged)
    reference_seconds = time.perf_counter() - t0
    ok = [(r, g) for r, g, _ in records if r["kind"] == "ok"]
    by_kind = {k: sum(r["kind"] == k for r, _, _ in records) for k in HOSTILE}
    if settled["jaxllm:num_requests_running"] or settled["jaxllm:num_requests_waiting"] or held_blocks or unfinished:
        failures.append({"kind": "leak", "why": f"after the run: {settled}, {held_blocks} blocks held"})
    if monitor.unhealthy or not alive:
        failures.append({"kind": "health", "why": f"unhealthy answers {monitor.unhealthy[:5]}, loop alive {alive}"})
    rss = [m for _, m in monitor.rss]
    return {
        "requests": len(records), "seconds": round(elapsed, 1), "load_seconds": round(load_seconds, 1),
        "reference_seconds": round(reference_seconds, 1), "clients": clients, "seed": seed,
        "well_formed": len(ok), "hostile": len(records) - len(ok), "hostile_by_kind": by_kind,
        "failed": len(failures), "failures": failures[:50],
        "greedy_checked": sum(r["body"]["temperature"] == 0 for r, _ in ok),
        "sampled_checked": sum(r["body"]["temperature"] > 0 for r, _ in ok), "distinct_references": references,
        "sampled_diverged": len(diverged), "sampled_divergences": diverged[:20],
        "latency_s": percentiles([g["latency"] for _, g in ok]),
        "latency_s_plain": percentiles([g["latency"] for r, g in ok if not r["stream"]]),
        "ttft_s_stream": percentiles([g["ttft"] for r, g in ok if r["stream"] and g["ttft"] is not None]),
        "health_polls": monitor.polls, "unhealthy_polls": len(monitor.unhealthy), "loop_alive": alive,
        "rss_mib": {"after_warmup": round(rss_start, 1), "end": round(rss_end, 1),
                    "peak": round(max(rss + [rss_end]), 1), "growth": round(rss_end - rss_start, 1),
                    "growth_second_half": round(rss_end - rss[len(rss) // 2], 1) if rss else None},
        "server_metrics": {k.removeprefix("jaxllm:"): v for k, v in settled.items() if k.startswith("jaxllm:")
                           and not k.endswith("_created") and "_bucket" not in k},
        "held_blocks": held_blocks,
    }


def settle(server, timeout: float = 60.0) -> dict[str, float]:
    """/metrics once nothing runs or waits (requests of clients that left may take a pass to abort)."""
    deadline = time.monotonic() + timeout
    while True:
        now = metrics(server.url)
        idle = now["jaxllm:num_requests_running"] + now["jaxllm:num_requests_waiting"] == 0
        if (idle and now["jaxllm:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def check_outputs(done: list[tuple[dict, dict]], cfg, params, tokenizer, failures: list, diverged: list) -> int:
    """Compare each well-formed answer with `Engine.generate` on its prompt alone (one reference
    per distinct prompt and settings, on a fresh engine). A greedy mismatch goes to `failures`; a
    sampled one to `diverged`: log-probs differ by float32 rounding (~1e-6) between passes of
    different shapes (a prompt prefilled whole, or after a prefix-cache hit), which flips a
    sampled token whose random draw lands that close to a boundary of the cumulative distribution."""
    engine = Engine(cfg, params, tokenizer=tokenizer, **ENGINE)
    refs = {}
    for req, got in done:
        key = reference_key(req, tokenizer)
        if key not in refs:
            refs[key] = engine.generate([list(key[0])], key[1])[0]
        want = refs[key]
        if (got["text"], got["finish_reason"]) != (want.text, want.finish_reason):
            (diverged if key[1].temperature > 0 else failures).append({
                "kind": "ok", "body": req["body"], "why": f"got {got['text']!r} ({got['finish_reason']}), "
                f"Engine.generate gives {want.text!r} ({want.finish_reason})"})
    return len(refs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hostile_frac", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "soak.json"))
    a = parser.parse_args()
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    stats = soak(requests=a.requests, duration=a.duration, clients=a.clients, hostile_frac=a.hostile_frac,
                 seed=a.seed)
    stats["command"] = "python benchmarks/soak.py " + " ".join(
        f"--{k}={getattr(a, k)}" for k in ("requests", "duration", "clients", "hostile_frac", "seed"))
    print(json.dumps(stats, indent=1))
    pathlib.Path(a.out).write_text(json.dumps(stats, indent=1) + "\n")
    raise SystemExit(1 if stats["failed"] else 0)


if __name__ == "__main__":
    main()
