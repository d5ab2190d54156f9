r"""Serve a Llama-family model with `jaxllm.serve.Engine`: batch generation or an HTTP server.

Batch: a JSONL of prompts to a JSONL of completions, with a progress bar.

  python -m launch.serve --source=MODEL --input=prompts.jsonl --output=completions.jsonl \
      [--config.sampling.max_tokens=128 --config.sampling.temperature=0.7 --config.engine.token_budget=512]

Server: the OpenAI-compatible API of `jaxllm.serve.api_server` (`/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`) on 127.0.0.1 unless `--host` says
otherwise. The port opens at once; `/health` answers 503 "loading" until the buckets are compiled.
Compiled programs go to JAX's persistent cache (`--compilation_cache`), so a restart is fast.

  python -m launch.serve --source=MODEL --port=8000 [--api_key=KEY --request_timeout=60]
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "def add(", "max_tokens": 32, "temperature": 0}'

`--source` is a jaxllm model directory, an HF Llama folder or a `launch.train` workdir, as read by
`jaxllm.model.load_model`. Text goes through the tokenizer the source carries (`tokenizer.model` or
`tokenizer.json`, `jaxllm.model.load_tokenizer`), so an HF folder speaks its own vocabulary;
`--tokenizer` overrides it (a tokenizer folder or `tokenizer.model` file, or `default` for the
shipped one). Generation stops at the tokenizer's EOS unless a request sets `ignore_eos`. Fields a request
leaves out take `--config.sampling` values (greedy, 64 tokens by default), in both modes.

Proxy-tuning (arXiv 2401.08565): `--expert=SMALL_TUNED --anti_expert=SMALL_BASE [--alpha=1.0]` serves
`--source` (the large base) steered at every decoding step by logits base + α·(expert − anti), in
both modes, through `jaxllm.methods.proxy_tuning.proxy_engine` (three models, each with its own
paged KV cache). The three sources are read like `--source`; every member sees the same prompt
tokens (the equal-context variant; a chat request's template is applied once, for all three). The
members' tokenizers must agree on every id of the base's (`check_vocabularies`), so text means the
same tokens to all three: a mismatch is a ValueError naming the first differing id; a member source
that does not exist, or carries no tokenizer, is a FileNotFoundError naming the member. `--tokenizer`
serves all three with one tokenizer (e.g. for a workdir that records none).

  python -m launch.serve --source=LARGE_BASE --expert=SMALL_TUNED --anti_expert=SMALL_BASE --alpha=1.0 \
      --input=prompts.jsonl --output=completions.jsonl

Input lines: `{"prompt": "text"}` or `{"prompt_ids": [1, 2, 3]}`, optionally with per-line
`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `n`, `stop` (strings), `stop_token_ids`,
`ignore_eos`.
Output lines, in input order: `{"index": i, "choices": [{"text", "token_ids", "logprobs",
"finish_reason"}, ...]}`, or `{"index": i, "error": "..."}` for a line that cannot be served (the
other lines are unaffected).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxllm import model as model_format
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods.proxy_tuning import check_vocabularies, proxy_engine
from jaxllm.serve import Engine, ProxyTriple, SamplingParams, api_server
from jaxllm.serve.sampling import check_alpha
from launch import common

REQUEST_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stop_token_ids", "ignore_eos")


def get_config() -> ml_collections.ConfigDict:
    """Engine settings and default sampling settings."""
    return ml_collections.ConfigDict({
        "engine": {"policy": "splitfuse", "token_budget": 256, "block_size": 16, "num_blocks": 1024,
                   "max_seqs": 64, "prefix_caching": True},
        "sampling": {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0, "n": 1,
                     "stop_token_ids": (), "ignore_eos": False},
    })


def build_engine(source: str, config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None, *,
                 expert: str | None = None, anti_expert: str | None = None, alpha: float = 1.0) -> Engine:
    """Load the model at `source` (`jaxllm.model.load_model`) and wrap it in an Engine with
    `config.engine` (and `tokenizer`, for text and stop strings). With `expert` and `anti_expert`:
    a proxy-tuned engine, `source` steered by base + α·(expert − anti) (`proxy_engine`);
    FileNotFoundError names a member whose source is missing, ValueError a non-finite α."""
    check_proxy(expert, anti_expert, alpha)
    if expert is None:
        model_cfg, params = model_format.load_model(source)
        return Engine(model_cfg, params, tokenizer=tokenizer, **dict(config.engine))
    members = [load_member(role, path) for role, path in
               (("base", source), ("expert", expert), ("anti_expert", anti_expert))]
    return proxy_engine(ProxyTriple(*(c for c, _ in members)), ProxyTriple(*(p for _, p in members)), alpha,
                        tokenizer=tokenizer, **dict(config.engine))


def check_proxy(expert: str | None, anti_expert: str | None, alpha: float) -> None:
    """ValueError unless the proxy-tuning arguments make a triple: both members or neither, and a
    finite α (checked before anything loads)."""
    if (expert is None) != (anti_expert is None):
        raise ValueError(f"proxy-tuning needs both an expert and an anti_expert, got expert={expert!r}, "
                         f"anti_expert={anti_expert!r}")
    if expert is not None:
        check_alpha(alpha)


def load_member(role: str, source: str):
    """(config, params) of one proxy member; FileNotFoundError names the member and its source."""
    try:
        return model_format.load_model(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"proxy {role} checkpoint {source!r} cannot be loaded: {err}") from err


def load_tokenizer(source: str, override: str = "", *, expert: str | None = None,
                   anti_expert: str | None = None) -> Tokenizer:
    """The tokenizer text is served with: the base's (or `override`, then used for every member).
    For a proxy triple, every member's tokenizer must match the base's on all of the base's ids and
    special ids (`check_vocabularies`: ValueError naming the first differing id); FileNotFoundError
    names a member that does not exist or carries no tokenizer."""
    tokenizer = model_format.load_tokenizer(source, override)
    tokenizer_lib.check_vocab(tokenizer, model_format.load_config(source).vocab_size)
    if expert is not None and anti_expert is not None:
        for role, path in (("expert", expert), ("anti_expert", anti_expert)):
            if not os.path.exists(path):
                raise FileNotFoundError(f"proxy {role} checkpoint {path!r} does not exist")
        check_vocabularies(tokenizer, *(_member_tokenizer(role, path, override) for role, path in
                                        (("expert", expert), ("anti_expert", anti_expert))),
                           vocab_size=tokenizer.vocab_size)
    return tokenizer


def _member_tokenizer(role: str, source: str, override: str):
    try:
        return model_format.load_tokenizer(source, override)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"proxy {role} {source!r} carries no tokenizer ({err}); pass --tokenizer to "
                                "serve every member with one tokenizer") from err


def sampling_params(request: dict, defaults: dict, tokenizer: Tokenizer | None) -> SamplingParams:
    """SamplingParams of one request: its fields over `defaults`; stops at the tokenizer's EOS
    unless `ignore_eos`. ValueError names an unknown or invalid field."""
    fields = {**defaults, **{k: v for k, v in request.items() if k in REQUEST_FIELDS and v is not None}}
    fields["stop"] = (fields["stop"],) if isinstance(fields.get("stop"), str) else tuple(fields.get("stop") or ())
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
            unknown = sorted(set(request) - set(REQUEST_FIELDS) - {"prompt", "prompt_ids"})
            if unknown:
                raise ValueError(f"line {index}: unknown fields {unknown}")
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
                    {"text": decode(tokenizer, c.tokens) if c.text is None else c.text, "token_ids": c.tokens,
                     "logprobs": c.logprobs, "finish_reason": c.finish_reason} for c in completions]
                progress.update(done=1)
    progress.close()
    return records


# ----------------------------------------------------------------------------- command line

def define_flags():
    """The command-line flags (defined only when run as a program)."""
    config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    flags.DEFINE_string("source", None, "Model: jaxllm model dir, HF folder or launch.train workdir.")
    flags.DEFINE_string("expert", None, "Proxy-tuning: the small tuned model steering --source (needs --anti_expert).")
    flags.DEFINE_string("anti_expert", None, "Proxy-tuning: the expert's untuned counterpart (needs --expert).")
    flags.DEFINE_float("alpha", 1.0, "Proxy-tuning: logits = base + alpha * (expert - anti_expert).")
    flags.DEFINE_string("tokenizer", "", "Tokenizer folder or tokenizer.model file, 'default' for the shipped one "
                        "('' = the one the source carries).")
    flags.DEFINE_string("input", None, "Batch mode: JSONL of prompts.")
    flags.DEFINE_string("output", None, "Batch mode: JSONL of completions to write.")
    flags.DEFINE_string("host", "127.0.0.1", "Server mode: address to listen on.")
    flags.DEFINE_integer("port", 8000, "Server mode: port.")
    flags.DEFINE_string("model_name", None, "Server mode: the model id clients name (default: --source).")
    flags.DEFINE_string("api_key", None, "Server mode: require 'Authorization: Bearer KEY' on /v1/*.")
    flags.DEFINE_integer("max_waiting", 256, "Server mode: waiting requests beyond which the server answers 503.")
    flags.DEFINE_integer("max_body_bytes", 1 << 20, "Server mode: largest request body (413 beyond).")
    flags.DEFINE_float("request_timeout", None, "Server mode: seconds before a request is aborted (408).")
    flags.DEFINE_string("compilation_cache", os.path.expanduser("~/.cache/jaxllm/jax_compilation_cache"),
                        "JAX persistent compilation cache directory ('' to disable).")
    flags.mark_flags_as_required(["source"])


def main(argv):
    common.start(argv)
    FLAGS = flags.FLAGS
    if (FLAGS.input is None) != (FLAGS.output is None):
        raise app.UsageError("batch mode needs both --input and --output")
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # each step waits for its tokens anyway
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    check_proxy(FLAGS.expert, FLAGS.anti_expert, FLAGS.alpha)
    proxy = dict(expert=FLAGS.expert, anti_expert=FLAGS.anti_expert)
    tokenizer = load_tokenizer(FLAGS.source, FLAGS.tokenizer, **proxy)
    defaults = dict(FLAGS.config.sampling)

    def load() -> Engine:
        return build_engine(FLAGS.source, FLAGS.config, tokenizer, alpha=FLAGS.alpha, **proxy)

    if FLAGS.input is not None:
        engine = load()
        with open(FLAGS.input) as f:
            lines = [line for line in f if line.strip()]
        records = generate_jsonl(engine, lines, tokenizer, defaults)
        with open(FLAGS.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        failed = sum("error" in r for r in records)
        print(f"wrote {len(records)} records to {FLAGS.output}" + (f" ({failed} failed)" if failed else ""))
        return
    config = api_server.ServerConfig(model_name=FLAGS.model_name or FLAGS.source, api_key=FLAGS.api_key,
                                     max_waiting=FLAGS.max_waiting, max_body_bytes=FLAGS.max_body_bytes,
                                     request_timeout=FLAGS.request_timeout, defaults=defaults)
    server = api_server.start_server(load, tokenizer, config, host=FLAGS.host, port=FLAGS.port)
    print(f"serving {config.model_name!r} on {server.url}/v1 (loading; /health answers 200 when ready)", flush=True)
    try:
        server.wait_ready()
        print(f"ready: {server.url}/v1", flush=True)
        server.serve_forever()
    finally:
        server.close()


if __name__ == "__main__":
    define_flags()
    common.run(main)
