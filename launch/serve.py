r"""Serve a Llama-family model with `jaxllm.serve.Engine`: batch generation or an HTTP server.

Batch: a JSONL of prompts to a JSONL of completions, with a progress bar.

  python -m launch.serve --source=MODEL --input=prompts.jsonl --output=completions.jsonl \
      [--config.sampling.max_tokens=128 --config.sampling.temperature=0.7 --config.engine.token_budget=512]

Server: an OpenAI-compatible `/v1/completions` endpoint (plus `/v1/models`) on localhost, streaming
with server-sent events when the request sets `"stream": true`.

  python -m launch.serve --source=MODEL --port=8000
  curl localhost:8000/v1/completions -d '{"prompt": "def add(", "max_tokens": 32, "temperature": 0}'

`--source` is a jaxllm model directory, an HF Llama folder, or a `launch.train` workdir (then
`--config.model.preset` and the overrides it was trained with name the model), as read by
`jaxllm.train.model_dir.load_model`. Text goes through the project tokenizer (`--tokenizer`, default
the shipped one); generation stops at its EOS unless a request sets `ignore_eos`. Fields a request
leaves out take `--config.sampling` values (greedy, 64 tokens by default), in both modes.

Input lines: `{"prompt": "text"}` or `{"prompt_ids": [1, 2, 3]}`, optionally with per-line
`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `n`, `stop_token_ids`, `ignore_eos`.
Output lines, in input order: `{"index": i, "choices": [{"text", "token_ids", "logprobs",
"finish_reason"}, ...]}`, or `{"index": i, "error": "..."}` for a line that cannot be served (the
other lines are unaffected).
"""
from __future__ import annotations

import http.server
import json
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterable

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.serve import Engine, SamplingParams
from jaxllm import configs
from jaxllm.train import model_dir
from launch import common

REQUEST_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop_token_ids", "ignore_eos")


def get_config() -> ml_collections.ConfigDict:
    """Model fields (for a training workdir), engine settings and default sampling settings."""
    model = configs.model_section({"preset": ""})
    model["rope_theta"] = 0.0
    return ml_collections.ConfigDict({
        "model": model,
        "engine": {"policy": "splitfuse", "token_budget": 256, "block_size": 16, "num_blocks": 1024,
                   "max_seqs": 64, "prefix_caching": True},
        "sampling": {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0, "n": 1,
                     "stop_token_ids": (), "ignore_eos": False},
    })


def build_engine(source: str, config: ml_collections.ConfigDict) -> Engine:
    """Load the model at `source` and wrap it in an Engine with `config.engine`."""
    model_cfg, params = model_dir.load_model(source, dict(config.model))
    return Engine(model_cfg, params, **dict(config.engine))


def sampling_params(request: dict, defaults: dict, tokenizer: Tokenizer | None) -> SamplingParams:
    """SamplingParams of one request: its fields over `defaults`; stops at the tokenizer's EOS
    unless `ignore_eos`. ValueError names an unknown or invalid field."""
    fields = {**defaults, **{k: v for k, v in request.items() if k in REQUEST_FIELDS and v is not None}}
    stop = tuple(fields.pop("stop_token_ids") or ())
    if tokenizer is not None and not fields.pop("ignore_eos"):
        stop += (tokenizer.eos_id,)
    fields.pop("ignore_eos", None)
    return SamplingParams(stop_tokens=stop, **fields)


def prompt_tokens(request: dict, tokenizer: Tokenizer | None) -> list[int]:
    """Token ids of a request's `prompt` (text, encoded with BOS) or `prompt_ids`."""
    if "prompt_ids" in request:
        return list(request["prompt_ids"])
    prompt = request.get("prompt")
    if isinstance(prompt, list):
        return prompt
    if not isinstance(prompt, str):
        raise ValueError(f"a request needs 'prompt' (text or token ids) or 'prompt_ids', got {sorted(request)}")
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer")
    return tokenizer.encode(prompt, bos=True)


def decode(tokenizer: Tokenizer | None, tokens: list[int]) -> str:
    """Text of generated tokens without a final EOS ('' without a tokenizer)."""
    if tokenizer is None:
        return ""
    if tokens and tokens[-1] == tokenizer.eos_id:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


class Progress:
    """A one-line progress bar on stderr: finished requests, elapsed time, output tokens/s."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 30):
        self.total, self.stream, self.width = total, stream, width
        self.done, self.tokens, self.start = 0, 0, time.perf_counter()

    def update(self, done: int = 0, tokens: int = 0) -> None:
        self.done += done
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        filled = self.width * self.done // max(self.total, 1)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} requests "
                          f"{elapsed:6.1f}s {self.tokens / max(elapsed, 1e-9):8.1f} tok/s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def generate_jsonl(engine: Engine, lines: Iterable[str], tokenizer: Tokenizer | None, defaults: dict,
                   progress: Progress | None = None) -> list[dict]:
    """Complete every JSONL line (one output record per line, in order; bad lines get an error)."""
    records, ids = [], {}
    for index, line in enumerate(lines):
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError(f"line {index} is not a JSON object")
            tokens = prompt_tokens(request, tokenizer)
            ids[engine.add_request(tokens, sampling_params(request, defaults, tokenizer), key=index)] = index
            records.append({"index": index})
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            records.append({"index": index, "error": str(err)})
    progress = progress or Progress(len(ids))
    while engine.has_unfinished():
        events = engine.step()
        finished = [e.request_id for e in events if e.finish_reason is not None]
        progress.update(tokens=len(events))
        for request_id in finished:
            if request_id in ids and engine.is_finished(request_id):
                completions = engine.completions(request_id)
                records[ids.pop(request_id)]["choices"] = [
                    {"text": decode(tokenizer, c.tokens), "token_ids": c.tokens, "logprobs": c.logprobs,
                     "finish_reason": c.finish_reason} for c in completions]
                progress.update(done=1)
    progress.close()
    return records


# ----------------------------------------------------------------------------- HTTP server

class EngineLoop:
    """Runs an Engine on a background thread; HTTP handler threads submit requests and read
    their tokens from per-request queues."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._queues: dict[int, queue.Queue] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, tokens: list[int], params: SamplingParams) -> tuple[int, queue.Queue]:
        """Queue a request; its TokenEvents arrive on the returned queue (None after its last
        sample finished). Raises ValueError for a bad request."""
        with self._lock:
            request_id = self.engine.add_request(tokens, params)
            self._queues[request_id] = out = queue.Queue()
        self._wake.set()
        return request_id, out

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                events = self.engine.step() if self.engine.has_unfinished() else None
                for e in events or ():
                    self._queues[e.request_id].put(e)
                    if e.finish_reason is not None and self.engine.is_finished(e.request_id):
                        self.engine.completions(e.request_id)
                        self._queues.pop(e.request_id).put(None)
            if events is None:
                self._wake.wait(timeout=0.5)
                self._wake.clear()


def make_server(loop: EngineLoop, tokenizer: Tokenizer | None, defaults: dict, *, host: str = "127.0.0.1",
                port: int = 8000, model_name: str = "jaxllm") -> http.server.ThreadingHTTPServer:
    """An HTTP server (not yet serving: call `serve_forever`) answering `/v1/completions` and
    `/v1/models` from `loop`. Port 0 picks a free port (`server.server_address`)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            absl_logging.info("%s " + format, self.address_string(), *args)

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._error(404, f"unknown path {self.path}")

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/completions":
                return self._error(404, f"unknown path {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
                prompts = body.get("prompt")
                batch = (isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list)))
                requests = [{**body, "prompt": p} for p in prompts] if batch else [body]
                params = [sampling_params(r, defaults, tokenizer) for r in requests]
                submitted = [loop.submit(prompt_tokens(r, tokenizer), p) for r, p in zip(requests, params)]
            except ValueError as err:
                return self._error(400, str(err))
            n = params[0].n
            meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": body.get("model") or model_name}
            if body.get("stream"):
                return self._stream(submitted, n, meta)
            choices = []
            for prompt_index, (_, out) in enumerate(submitted):
                tokens: dict[int, list] = {}
                while (e := out.get()) is not None:
                    tokens.setdefault(e.sample_index, []).append(e)
                for j in sorted(tokens):
                    ids = [e.token for e in tokens[j]]
                    choice = {"index": prompt_index * n + j, "text": decode(tokenizer, ids), "token_ids": ids,
                              "finish_reason": tokens[j][-1].finish_reason, "logprobs": None}
                    if body.get("logprobs") is not None:
                        choice["logprobs"] = {"token_logprobs": [e.logprob for e in tokens[j]]}
                    choices.append(choice)
            usage = {"prompt_tokens": sum(len(prompt_tokens(r, tokenizer)) for r in requests),
                     "completion_tokens": sum(len(c["token_ids"]) for c in choices)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self._json(200, {**meta, "choices": choices, "usage": usage})

        def _stream(self, submitted, n, meta) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for prompt_index, (_, out) in enumerate(submitted):
                texts: dict[int, list[int]] = {}
                while (e := out.get()) is not None:
                    before = decode(tokenizer, texts.setdefault(e.sample_index, []))
                    texts[e.sample_index].append(e.token)
                    delta = decode(tokenizer, texts[e.sample_index])[len(before):]
                    choice = {"index": prompt_index * n + e.sample_index, "text": delta, "token_ids": [e.token],
                              "logprobs": {"token_logprobs": [e.logprob]}, "finish_reason": e.finish_reason}
                    self.wfile.write(f"data: {json.dumps({**meta, 'choices': [choice]})}\n\n".encode())
                    self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return http.server.ThreadingHTTPServer((host, port), Handler)


# ----------------------------------------------------------------------------- command line

def define_flags():
    """The command-line flags (defined only when run as a program)."""
    config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    flags.DEFINE_string("source", None, "Model: jaxllm model dir, HF folder or launch.train workdir.")
    flags.DEFINE_string("tokenizer", "", "SentencePiece tokenizer.model ('' = the shipped one).")
    flags.DEFINE_string("input", None, "Batch mode: JSONL of prompts.")
    flags.DEFINE_string("output", None, "Batch mode: JSONL of completions to write.")
    flags.DEFINE_string("host", "127.0.0.1", "Server mode: address to listen on.")
    flags.DEFINE_integer("port", 8000, "Server mode: port.")
    flags.mark_flags_as_required(["source"])


def main(argv):
    common.start(argv)
    FLAGS = flags.FLAGS
    if (FLAGS.input is None) != (FLAGS.output is None):
        raise app.UsageError("batch mode needs both --input and --output")
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # each step waits for its tokens anyway
    tokenizer = Tokenizer.load(FLAGS.tokenizer) if FLAGS.tokenizer else Tokenizer.default()
    engine = build_engine(FLAGS.source, FLAGS.config)
    defaults = dict(FLAGS.config.sampling)
    if FLAGS.input is not None:
        with open(FLAGS.input) as f:
            lines = [line for line in f if line.strip()]
        records = generate_jsonl(engine, lines, tokenizer, defaults)
        with open(FLAGS.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        failed = sum("error" in r for r in records)
        print(f"wrote {len(records)} records to {FLAGS.output}" + (f" ({failed} failed)" if failed else ""))
        return
    engine.precompile()
    loop = EngineLoop(engine)
    server = make_server(loop, tokenizer, defaults, host=FLAGS.host, port=FLAGS.port, model_name=FLAGS.source)
    print(f"serving {FLAGS.source} on http://{server.server_address[0]}:{server.server_address[1]}/v1/completions",
          flush=True)
    try:
        server.serve_forever()
    finally:
        loop.close()


if __name__ == "__main__":
    define_flags()
    app.run(main)
