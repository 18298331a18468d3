"""Continuous batching: one worker thread admits, steps and retires; asyncio handlers await it.

Each loop iteration admits waiting requests while the batch has room (selection pass + prefill
on their prompt's KV, merged into the running batch), runs one decode step for every running
row, and retires finished or cancelled rows. New requests therefore start between decode steps
of the running ones instead of waiting for the batch to end.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from idp_core.generate import Batch, Engine, GenRequest, GenResult, RunningRequest, TokenLogprob
from server.errors import BadRequest, EngineStepError, OutOfMemory, QueueFull, ServerDraining
from server.metrics import Metrics

log = logging.getLogger(__name__)

TRIM_EVERY_S = 5.0  # at most one malloc_trim per interval, after requests finish


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS).

    Batches of ever-changing shapes leave freed tensor memory in glibc's arenas, which it keeps
    instead of returning to the OS: resident memory grows while live tensors stay flat, and
    malloc_trim(0) hands much of it back (`idp bench memory`; figures in docs/reliability.md).
    """
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@dataclass
class Update:
    """What a handler receives: new text/tokens while running, then the result or an error."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    result: GenResult | None = None
    error: Exception | None = None


@dataclass
class Submission:
    """A queued or running request and the channel its updates travel back on."""

    request: GenRequest
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue[Update]
    stream: bool
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    cancelled: bool = False
    by_client: bool = False  # cancelled because the client left (counted as a disconnect)
    sent_tokens: int = 0
    sent_chars: int = 0

    def push(self, update: Update) -> None:
        self.loop.call_soon_threadsafe(self.updates.put_nowait, update)

    def cancel(self, *, by_client: bool) -> None:
        """Free the queue or batch slot at the next step (a no-op once finished). Only a
        client's leaving counts as a disconnect: a timeout or a failed sibling prompt is counted
        once, as itself, where it is raised."""
        if not self.cancelled:  # the engine thread reads `cancelled`, then `by_client`
            self.by_client = by_client
            self.cancelled = True

    @property
    def num_tokens(self) -> int:  # positions this request may occupy, prefix excluded
        return len(self.request.input_ids) + self.request.config.max_tokens


class Scheduler:
    """Schedules requests onto the engine from its one model thread; handlers `submit` a request
    and read its `updates`."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queue: int,
        static: bool = False,
        fault_token_id: int = -1,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.static = static  # benchmark baseline: admit only into an empty batch
        self.fault_token_id = fault_token_id  # testing: steps holding this prompt token raise
        self._waiting: collections.deque[Submission] = collections.deque()
        self._running: dict[str, Submission] = {}
        self._cond = threading.Condition()
        self._stop = False
        self.draining = False
        self.selection_counts: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="idp-engine", daemon=True)
        self._trim = _malloc_trim()
        self._last_trim = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def submit(self, requests: list[GenRequest], *, stream: bool) -> list[Submission]:
        """Queue a request's validated prompts, all or none, or refuse them now (before any
        response has started): more prompts than the queue holds are a bad request (400), a
        queue without room for them all is full (503, retry)."""
        if self.draining:
            raise ServerDraining("the server is shutting down")
        if len(requests) > self.max_queue:
            raise BadRequest(f"{len(requests)} prompts in one request; this server queues at most "
                             f"{self.max_queue} (IDP_MAX_QUEUE)", param="prompt")
        loop = asyncio.get_running_loop()
        works = [Submission(r, loop, asyncio.Queue(), stream) for r in requests]
        with self._cond:
            if len(self._waiting) + len(works) > self.max_queue:  # drop those already cancelled
                for w in [w for w in self._waiting if w.cancelled]:
                    self._waiting.remove(w)
                    self._record_cancel(w)
            if len(self._waiting) + len(works) > self.max_queue:
                raise QueueFull(f"the wait queue is full ({self.max_queue} requests)")
            self._waiting.extend(works)
            self._cond.notify()
        return works

    def _record_cancel(self, work: Submission) -> None:
        if work.by_client:
            self.metrics.record_error("client_disconnected")

    @staticmethod
    async def updates(work: Submission) -> AsyncIterator[Update]:
        """A submission's updates until its result or error. A reader that stops early
        `cancel`s the submission (server/streaming.py), saying why."""
        while True:
            update = await work.updates.get()
            yield update
            if update.result is not None or update.error is not None:
                return

    # ---- worker thread --------------------------------------------------------------------
    def _loop(self) -> None:
        batch: Batch | None = None
        while True:
            with self._cond:
                while not self._stop and not self._waiting and batch is None:
                    self._cond.wait()
                if self._stop:
                    return
                admitted = self._take_admissible(batch)
            try:
                if admitted:
                    batch = self._admit(batch, admitted)
                if batch is not None:
                    batch = self._step(batch)
            except Exception as e:  # never let the model thread die: fail what it held
                log.exception("engine iteration failed; failing %d requests", len(self._running))
                self._fail(list(self._running.values()), e)
                batch = None
            with self._cond:
                self.metrics.record_queue(len(self._running), len(self._waiting))

    def _take_admissible(self, batch: Batch | None) -> list[Submission]:
        """Pop waiting requests that fit the batch limits (called with the lock held)."""
        if self.static and batch is not None:
            return []
        rows = 0 if batch is None else len(batch.seqs)
        tokens = sum(w.num_tokens for w in self._running.values())
        taken: list[Submission] = []
        while self._waiting and rows + len(taken) < self.max_batch_size:
            work = self._waiting[0]
            if work.cancelled:  # cancelled while queued
                self._record_cancel(self._waiting.popleft())
                continue
            if taken and tokens + work.num_tokens > self.max_batch_tokens:
                break
            if not taken and rows and tokens + work.num_tokens > self.max_batch_tokens:
                break
            tokens += work.num_tokens
            taken.append(self._waiting.popleft())
        return taken

    def _admit(self, batch: Batch | None, works: list[Submission]) -> Batch | None:
        now = time.perf_counter()
        for w in works:
            w.admitted = now
            self._running[w.request.request_id] = w
        try:
            new = self.engine.start([w.request for w in works])
        except Exception as e:  # only the newcomers fail; the running batch goes on
            log.exception("prefill failed for requests %s", [w.request.request_id for w in works])
            self._fail(works, e)
            return batch
        self._publish(new)
        return new if batch is None else self.engine.merge(batch, new)

    def _step(self, batch: Batch) -> Batch | None:
        for s in batch.seqs:
            if self._running[s.request.request_id].cancelled and s.finish_reason is None:
                s.finish_reason = "abort"
        batch, done = self.engine.retire(batch)
        self._finish(done)
        if batch is None:
            return None
        self.metrics.record_step(len(batch.seqs), len(self._running), len(self._waiting))
        try:
            if any(self.fault_token_id in s.request.input_ids for s in batch.seqs):
                raise RuntimeError(f"injected fault (token {self.fault_token_id})")
            self.engine.step(batch)
        except Exception as e:  # only this step's requests fail; the server keeps serving
            works = [self._running[s.request.request_id] for s in batch.seqs]
            log.exception("decode step failed for requests %s",
                          [w.request.request_id for w in works])
            self._fail(works, e)
            return None
        self._publish(batch)
        batch, done = self.engine.retire(batch)
        self._finish(done)
        return batch

    def _publish(self, batch: Batch) -> None:
        """Send streaming clients their new tokens and text."""
        for s in batch.seqs:
            work = self._running[s.request.request_id]
            if not work.stream or s.finish_reason is not None:
                continue  # finished rows get everything with their result
            self._push_delta(work, s, final=False)

    def _push_delta(self, work: Submission, s: RunningRequest, *, final: bool) -> None:
        text = self.engine.text(s)
        if not final:
            # hold back an incomplete UTF-8 character and a possible stop-string prefix
            hold = max((len(x) - 1 for x in s.config.stop), default=0)
            text = text.rstrip("\ufffd")
            text = text[: max(len(text) - hold, work.sent_chars)]
        new_ids = s.output_ids[work.sent_tokens :]
        new_lps = s.output_logprobs[work.sent_tokens :] if s.config.logprobs is not None else []
        if not new_ids and len(text) <= work.sent_chars and not final:
            return
        delta = text[work.sent_chars :]
        work.sent_tokens, work.sent_chars = len(s.output_ids), max(len(text), work.sent_chars)
        work.push(Update(text=delta, token_ids=new_ids, logprobs=new_lps))

    def _finish(self, done: list[RunningRequest]) -> None:
        now = time.perf_counter()
        for s in done:
            work = self._running.pop(s.request.request_id)
            result = self.engine.result(s)
            if s.finish_reason == "abort":
                if work.by_client:
                    self.metrics.record_error("client_disconnected", result.method)
                continue
            self.selection_counts[result.prompt_used] += 1
            self.metrics.record_finished(result, arrival=work.arrival, admitted=work.admitted,
                                         finished=now)
            if work.stream:
                self._push_delta(work, s, final=True)
            work.push(Update(result=result))
        if done and self._trim is not None and now - self._last_trim >= TRIM_EVERY_S:
            self._trim(0)  # hand the freed batch memory back to the OS
            self._last_trim = time.perf_counter()

    def _fail(self, works: list[Submission], error: Exception) -> None:
        oom = isinstance(error, torch.cuda.OutOfMemoryError)
        if oom:
            torch.cuda.empty_cache()  # keep serving: the next batch starts from a clean pool
        for w in works:
            self._running.pop(w.request.request_id, None)
            rid = w.request.request_id
            self.metrics.record_error("out_of_memory" if oom else "engine_error")
            w.push(Update(error=OutOfMemory(rid) if oom else EngineStepError(rid, error)))
