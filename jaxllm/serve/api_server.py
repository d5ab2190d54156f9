"""OpenAI-compatible HTTP API over an `EngineLoop` (FastAPI + uvicorn, as vLLM's server).

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (messages through the tokenizer's
chat template), `GET /v1/models`, `GET /health` (503 {"status": "loading"} until the engine is
compiled and ready), `GET /metrics` (Prometheus text, `jaxllm.serve.metrics`). Request fields,
response objects and server-sent event streams follow OpenAI's API (`jaxllm.serve.openai_protocol`);
errors are OpenAI-style JSON `{"error": {"message", "type", "param", "code"}}` with the status
that fits: 400 for a malformed body or a bad field (named in `param`), 401 without the API key,
404 for an unknown model, 413 for a body over `max_body_bytes`, 503 while loading or when the
waiting queue is full, 408 past a request's timeout. A request whose client disconnects (streaming
or not) or whose timeout passes is aborted in the engine at once.

`start_server(load, ...)` serves in-process on a background thread: the port opens at once and
`load()` (build and compile the engine) runs behind `/health`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import socket
import threading
import time
from collections.abc import Callable

import fastapi
import pydantic
import uvicorn
from absl import logging as absl_logging
from fastapi import responses

from jaxllm.serve import openai_protocol as protocol
from jaxllm.serve.engine import Engine
from jaxllm.serve.outputs import Completion, TokenEvent
from jaxllm.serve.engine_loop import EngineLoop, Overloaded, RequestTimeout
from jaxllm.serve.metrics import ServerMetrics


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Server settings. `defaults`: SamplingParams fields a request leaves out (as in
    `launch/serve.py`'s `--config.sampling`). `request_timeout`: seconds before a request is
    aborted (None: never; a request's own `timeout` field overrides it)."""
    model_name: str = "jaxllm"
    api_key: str | None = None
    max_waiting: int = 256
    max_body_bytes: int = 1 << 20
    request_timeout: float | None = None
    defaults: dict = dataclasses.field(default_factory=dict)


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> responses.JSONResponse:
        return responses.JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                                 "code": self.status}}, status_code=self.status)


class _State:
    """What the handlers share: the loop once loaded, the tokenizer, settings, metrics."""

    def __init__(self, tokenizer, config: ServerConfig):
        self.tokenizer, self.config = tokenizer, config
        self.metrics = ServerMetrics()
        self.loop: EngineLoop | None = None
        self.error: str | None = None


def create_app(tokenizer, config: ServerConfig) -> tuple[fastapi.FastAPI, _State]:
    """The FastAPI app; serving starts when `state.loop` is set (see `start_server`)."""
    state = _State(tokenizer, config)
    app = fastapi.FastAPI(title="jaxllm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return err.response()

    @app.exception_handler(404)
    async def not_found(request, _):
        return APIError(404, f"unknown path {request.url.path}", kind="not_found_error").response()

    @app.get("/health")
    async def health():
        if state.error:
            return responses.JSONResponse({"status": "failed", "error": state.error}, status_code=503)
        if state.loop is None:
            return responses.JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"} if state.loop.alive else responses.JSONResponse({"status": "dead"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return responses.Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: fastapi.Request):
        _authorize(request, config)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "jaxllm"}]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await _parse(request, state, protocol.CompletionRequest)
        try:
            prompts = protocol.completion_prompts(body, tokenizer)
        except ValueError as err:
            raise APIError(400, str(err), "prompt") from None
        return await _serve(request, state, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await _parse(request, state, protocol.ChatRequest)
        try:
            prompt = protocol.chat_prompt(body, tokenizer)
        except ValueError as err:
            raise APIError(400, str(err), "messages") from None
        return await _serve(request, state, body, [prompt], chat=True)

    return app, state


def _authorize(request: fastapi.Request, config: ServerConfig) -> None:
    if config.api_key is not None and request.headers.get("authorization") != f"Bearer {config.api_key}":
        raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", kind="authentication_error")


async def _parse(request: fastapi.Request, state: _State, model: type[pydantic.BaseModel]):
    """The validated body: 401/413/400/404/503 as the request deserves."""
    config = state.config
    _authorize(request, config)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {config.max_body_bytes}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > config.max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {config.max_body_bytes} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"malformed JSON body: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        body = model.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(x) for x in first["loc"])
        raise APIError(400, f"{param}: {first['msg']}", param) from None
    if body.model is not None and body.model != config.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {config.model_name!r}",
                       "model", kind="not_found_error")
    if state.loop is None:
        raise APIError(503, "the model is loading; retry when /health answers 200", kind="server_error")
    return body


async def _serve(request: fastapi.Request, state: _State, body, prompts: list[list[int]], *, chat: bool):
    """Submit every (prompt, sample) request, then answer in one JSON or as an event stream."""
    engine: Engine = state.loop.engine
    timeout = body.timeout if body.timeout is not None else state.config.request_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    aio = asyncio.get_running_loop()
    queues, ids = [], []
    try:
        params = [protocol.sampling_params(body, p, engine, state.tokenizer, state.config.defaults, chat=chat)
                  for p in prompts]
        echoed = [await asyncio.to_thread(protocol.echo_logprobs, body, p, engine, chat) for p in prompts]
        for prompt, p in zip(prompts, params):
            out: asyncio.Queue = asyncio.Queue()
            queues.append(out)
            if p is None:  # echo with max_tokens 0: nothing to generate
                out.put_nowait([])
                continue
            ids.append(await _submit(state, prompt, p, functools.partial(_deliver, aio, out), deadline))
    except RequestTimeout:
        _abort(state, ids)
        raise _timed_out() from None
    except ValueError as err:
        _abort(state, ids)
        raise APIError(400, str(err), getattr(err, "param", None) or protocol.param_of(str(err))) from None
    except Overloaded as err:
        _abort(state, ids)
        raise APIError(503, f"server overloaded: {err}", kind="server_error") from None
    meta = protocol.response_meta(chat, state.config.model_name)
    n = body.n
    if body.stream:
        return responses.StreamingResponse(
            _stream(request, state, body, prompts, queues, ids, meta, chat),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        results = [await _collect(out, gone) for out in queues]
    except _ClientGone:
        _abort(state, ids)
        return responses.Response(status_code=499)  # nobody is listening (nginx's "client closed request")
    except BaseException:
        _abort(state, ids)
        raise
    finally:
        gone.cancel()
    choices = []
    for i, (prompt, completions) in enumerate(zip(prompts, results)):
        for j in range(n):
            c = completions[j] if completions else Completion(-1, j, [], [], "length", 0, "", ())
            choices.append(protocol.choice(c, i * n + j, body, prompt, echoed[i], state.tokenizer, chat))
    usage = protocol.usage(prompts, [c for cs in results for c in cs])
    return {**meta, "choices": choices, "usage": usage}


async def _submit(state: _State, prompt: list[int], params, deliver, deadline: float | None) -> int:
    """Submit off the event loop (submitting waits for the pass in progress). If the handler is
    cancelled meanwhile (its client left), the request is aborted as soon as it is in. The engine
    loop enforces the deadline."""
    task = asyncio.ensure_future(asyncio.to_thread(state.loop.submit, prompt, params, deliver, deadline=deadline))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: t.cancelled() or t.exception() or state.loop.abort(t.result()))
        raise


def _deliver(aio: asyncio.AbstractEventLoop, out: asyncio.Queue, item) -> None:
    """Called on the engine-loop thread: hand an item to the request's queue on the event loop."""
    aio.call_soon_threadsafe(out.put_nowait, item)


class _ClientGone(Exception):
    """The client of a request disconnected."""


async def _disconnected(request: fastapi.Request) -> None:
    """Returns when the client disconnects (the body is already read: the next ASGI message is
    the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(out: asyncio.Queue, gone: asyncio.Future) -> list[Completion]:
    """The request's completions, skipping its token events."""
    while True:
        item = await _next(out, gone)
        if isinstance(item, list):
            return item


async def _next(out: asyncio.Queue, gone: asyncio.Future):
    """The next item of a request's queue; 408 when the engine loop timed it out, _ClientGone
    when `gone` (the client's disconnect) is done first."""
    get = asyncio.ensure_future(out.get())
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get not in done:
        get.cancel()
        raise _ClientGone()
    item = get.result()
    if isinstance(item, RequestTimeout):
        raise _timed_out()
    if isinstance(item, Exception):
        raise APIError(500, f"the request failed: {item}", kind="server_error")
    return item


async def _stream(request, state, body, prompts, queues, ids, meta, chat):
    """Server-sent events: per token a chunk, the last with its finish_reason, `[DONE]` at the end.
    A client that leaves ends the stream (and aborts its requests) at once."""
    n, tokenizer = body.n, state.tokenizer
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        if chat:
            for i in range(len(prompts) * n):
                yield protocol.sse(protocol.chat_chunk(meta, i, {"role": "assistant", "content": ""}, None, None))
        finished: list[Completion] = []
        for i, out in enumerate(queues):
            while True:
                try:
                    item = await _next(out, gone)
                except _ClientGone:
                    return
                except APIError as err:
                    yield protocol.sse({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                                  "code": err.status}})
                    _abort(state, ids)
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(item, list):
                    finished += item
                    break
                event: TokenEvent = item
                index = i * n + event.sample_index
                if not event.text and event.finish_reason is None and not body.wants_logprobs:
                    continue
                yield protocol.sse(protocol.stream_chunk(meta, index, event, body, tokenizer, chat))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield protocol.sse({**meta, "choices": [], "usage": protocol.usage(prompts, finished)})
        yield "data: [DONE]\n\n"
    finally:
        gone.cancel()
        _abort(state, ids)  # client gone or done: abort whatever is still running (a no-op otherwise)


def _timed_out() -> APIError:
    return APIError(408, "the request timed out", "timeout", kind="timeout_error")


def _abort(state: _State, ids: list[int]) -> None:
    for request_id in ids:
        state.loop.abort(request_id)


# ---- in-process serving --------------------------------------------------------------------------

class Server:
    """A server on a background thread: `url`, `wait_ready()`, `close()`."""

    def __init__(self, app, state: _State, sock: socket.socket, loader: threading.Thread):
        self.state, self._socket, self._loader = state, sock, loader
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="uvicorn",
                                        daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the engine is loaded and compiled; RuntimeError if loading failed."""
        self._loader.join(timeout)
        if self.state.error:
            raise RuntimeError(f"loading the engine failed: {self.state.error}")
        if self.state.loop is None:
            raise TimeoutError(f"the engine was not ready after {timeout} s")

    def serve_forever(self) -> None:
        self._thread.join()

    def close(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)
        self._loader.join(timeout=30)
        if self.state.loop is not None:
            self.state.loop.close()
        self._socket.close()


def start_server(load: Callable[[], Engine], tokenizer, config: ServerConfig, *, host: str = "127.0.0.1",
                 port: int = 8000, precompile: bool = True) -> Server:
    """Listen on (host, port) at once (port 0: a free one, see `Server.url`) and load the engine
    behind `/health`: `load()` builds it (with `tokenizer`, for text and stop strings), then every
    bucket is compiled (`Engine.precompile`) unless `precompile` is False."""
    app, state = create_app(tokenizer, config)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)

    def loading():
        try:
            engine = load()
            if engine.tokenizer is None:
                raise ValueError("the engine needs the tokenizer (Engine(..., tokenizer=...)) for text and stops")
            if precompile:
                start = time.perf_counter()
                pairs = engine.precompile()
                absl_logging.info("compiled %d bucket pairs in %.1f s", pairs, time.perf_counter() - start)
            state.loop = EngineLoop(engine, max_waiting=config.max_waiting, metrics=state.metrics)
        except Exception as err:  # noqa: BLE001 - reported by /health and wait_ready
            absl_logging.exception("loading the engine failed")
            state.error = f"{type(err).__name__}: {err}"

    loader = threading.Thread(target=loading, name="engine-load", daemon=True)
    loader.start()
    return Server(app, state, sock, loader)
