"""An Engine stepped on a background thread, for servers: submit, stream, abort, metrics.

Callers on other threads (or an asyncio loop) `submit` a request with a `deliver` callback; the
loop thread calls it with each `TokenEvent` of the request, then once with the request's list of
`Completion`s when every sample finished, or with an exception when the request failed. One
request's failure (a bad sample, a bug in its bookkeeping) fails that request alone; the loop
goes on. A bounded waiting queue answers `Overloaded` at once instead of queueing without limit.
A request may carry a deadline: past it the loop aborts the request between passes (and one whose
deadline passed before it was submitted is never admitted), delivering `RequestTimeout`.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence

from absl import logging as absl_logging

from jaxllm.serve.engine import Engine
from jaxllm.serve.metrics import ServerMetrics
from jaxllm.serve.sampling import SamplingParams


class Overloaded(RuntimeError):
    """The waiting queue is full; retry later."""


class RequestTimeout(TimeoutError):
    """The request's deadline passed before it finished."""


class EngineLoop:
    """Runs `engine` on a daemon thread. `max_waiting`: requests queued (not yet admitted) beyond
    which `submit` raises Overloaded."""

    def __init__(self, engine: Engine, *, max_waiting: int = 256, metrics: ServerMetrics | None = None):
        if max_waiting <= 0:
            raise ValueError(f"max_waiting must be positive, got {max_waiting}")
        self.engine, self.max_waiting = engine, max_waiting
        self.metrics = metrics or ServerMetrics()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._requests: dict[int, _Request] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, tokens: Sequence[int], params: SamplingParams, deliver: Callable[[object], None], *,
               deadline: float | None = None) -> int:
        """Queue a request; returns its id. `deadline` (a `time.monotonic()` instant) bounds the
        request's life. Raises ValueError for a bad request, Overloaded when `max_waiting` requests
        are already waiting, RequestTimeout when the deadline has passed already (submitting waits
        for the pass in progress)."""
        with self._lock:
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestTimeout("the request timed out before it was admitted")
            waiting = {seq.request_index for seq in self.engine.scheduler.waiting}
            if len(waiting) >= self.max_waiting:
                raise Overloaded(f"{len(waiting)} requests are waiting (max_waiting {self.max_waiting})")
            request_id = self.engine.add_request(list(tokens), params)
            self._requests[request_id] = _Request(deliver, len(tokens), time.perf_counter(), deadline)
            self.metrics.prompt_tokens.inc(len(tokens))
            self._snapshot()
        self._wake.set()
        return request_id

    def abort(self, request_id: int) -> bool:
        """Stop a request now (client gone, timeout); False if it already finished or is unknown."""
        with self._lock:
            aborted = self._abort(request_id)
            self._snapshot()
        return aborted

    def _abort(self, request_id: int) -> bool:
        self._requests.pop(request_id, None)
        aborted = self.engine.abort(request_id)
        if aborted:
            self.metrics.aborts.inc()
        return aborted

    @contextlib.contextmanager
    def paused(self):
        """Hold the loop between passes, e.g. to `set_params` on the engine or run
        `Engine.generate` on it while no request is in flight."""
        with self._lock:
            yield self.engine

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._expire(time.monotonic())
                try:
                    events = self.engine.step() if self.engine.has_unfinished() else None
                except Exception as err:  # noqa: BLE001 - a failed pass fails its requests, not the loop
                    absl_logging.exception("engine step failed; failing every request in flight")
                    for request_id in list(self._requests):
                        self._fail(request_id, err)
                    events = []
                for request_id, err in self.engine.take_failures().items():
                    self._fail(request_id, err)
                now = time.perf_counter()
                for event in events or ():
                    request = self._requests.get(event.request_id)
                    if request is not None:
                        self._call(event.request_id, request, event, now)
                for request_id in {e.request_id for e in events or () if e.finish_reason is not None}:
                    self._close(request_id)
                self._snapshot()
            if events is None:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _expire(self, now: float) -> None:
        """Abort the requests whose deadline has passed; each receives RequestTimeout."""
        for request_id, request in list(self._requests.items()):
            if request.deadline is not None and now >= request.deadline:
                self._abort(request_id)
                try:
                    request.deliver(RequestTimeout("the request timed out"))
                except Exception:  # noqa: BLE001 - the receiver is gone; nothing left to fail
                    absl_logging.exception("request %d: delivering its timeout failed", request_id)

    def _call(self, request_id: int, request: _Request, event, now: float) -> None:
        try:
            self.metrics.generation_tokens.inc()
            last = request.last_token.get(event.sample_index)
            if last is None and not request.last_token:
                self.metrics.time_to_first_token.observe(now - request.start)
            elif last is not None:
                self.metrics.inter_token_latency.observe(now - last)
            request.last_token[event.sample_index] = now
            request.deliver(event)
        except Exception as err:  # noqa: BLE001
            self._fail(request_id, err)

    def _close(self, request_id: int) -> None:
        """Hand over a request whose samples all finished (several may finish in one step)."""
        if not self.engine.is_finished(request_id):
            return
        completions = self.engine.completions(request_id)
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self.metrics.record_prefix(request.num_prompt_tokens, min(c.num_cached_tokens for c in completions))
        try:
            request.deliver(completions)
        except Exception:  # noqa: BLE001 - the receiver is gone; nothing left to fail
            absl_logging.exception("request %d: delivering its completions failed", request_id)

    def _fail(self, request_id: int, err: Exception) -> None:
        absl_logging.error("request %d failed: %r", request_id, err)
        request = self._requests.pop(request_id, None)
        self.engine.abort(request_id)
        if request is not None:
            try:
                request.deliver(err)
            except Exception:  # noqa: BLE001
                pass

    def _snapshot(self) -> None:
        """Queue and pool sizes for the metrics (read by scrapes on other threads)."""
        scheduler = self.engine.scheduler
        blocks = scheduler.blocks
        self.metrics.set_state(running=len({s.request_index for s in scheduler.running}),
                               waiting=len({s.request_index for s in scheduler.waiting}),
                               kv_usage=float((blocks.ref_counts > 0).sum()) / blocks.num_blocks)


class _Request:
    """Loop-side state of one request: its receiver, prompt size, submit time, deadline (monotonic),
    last token times."""

    def __init__(self, deliver, num_prompt_tokens: int, start: float, deadline: float | None):
        self.deliver, self.num_prompt_tokens, self.start, self.deadline = deliver, num_prompt_tokens, start, deadline
        self.last_token: dict[int, float] = {}
