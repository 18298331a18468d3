"""Waiting on the scheduler: collect a request's results or merge its streams, and send a
stream as server-sent events. Whatever ends a wait early cancels the request's submissions and
says why: the client left (counted as a disconnect), or its own error (counted as itself)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from idp_core.generate import GenResult
from server.errors import COUNTED_BY_ENGINE, APIError, ClientDisconnected, Timeout, error_body
from server.scheduler import Submission, Update
from server.state import ServingState

log = logging.getLogger(__name__)


async def collect_all(s: ServingState, works: list[Submission],
                      request: Request) -> list[GenResult]:
    """Wait for the results; a client that disconnects first cancels its requests."""
    timeout_s = request.app.state.settings.request_timeout_s

    async def result(work: Submission) -> GenResult:
        async with contextlib.aclosing(s.scheduler.updates(work)) as updates:
            async for u in updates:
                if u.error is not None:
                    raise u.error
                if u.result is not None:
                    return u.result
        raise RuntimeError("engine ended a request without a result")

    children = [asyncio.create_task(result(w)) for w in works]
    task = asyncio.create_task(asyncio.wait_for(asyncio.gather(*children), timeout_s))
    gone = asyncio.create_task(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        by_client = not task.done()
        task.cancel()  # no-op once done
        for c in children:  # ends the waits of a failed prompt's siblings too
            c.cancel()
        for w in works:  # no-op for finished ones; frees the slots of the rest
            w.cancel(by_client=by_client)
    if by_client:
        raise ClientDisconnected("the client disconnected")
    try:
        return list(task.result())
    except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11 on
        raise Timeout(f"no result within {timeout_s} s") from None


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge_streams(s: ServingState, works: list[Submission]
                        ) -> AsyncIterator[tuple[int, Update]]:
    """Updates of several submissions as they come, tagged with the submission's index."""
    queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()

    async def pump(i: int, work: Submission) -> None:
        async with contextlib.aclosing(s.scheduler.updates(work)) as updates:
            async for u in updates:
                await queue.put((i, u))

    tasks = [asyncio.create_task(pump(i, w)) for i, w in enumerate(works)]
    try:
        remaining = len(works)
        while remaining:
            i, u = await queue.get()
            if u.error is not None:
                raise u.error
            remaining -= u.result is not None
            yield i, u
    finally:
        for t in tasks:
            t.cancel()


def sse(events: AsyncIterator[dict[str, Any]], works: list[Submission],
        request: Request) -> StreamingResponse:
    """Server-sent events ending in `data: [DONE]`; an error mid-stream becomes an error event.
    However the stream ends, `works` still queued or running are cancelled."""

    async def body() -> AsyncIterator[str]:
        by_client = True  # a stream that stops without an error stops because the client left
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:  # headers are sent: report in-band, as OpenAI does
            by_client = False
            if not isinstance(e, COUNTED_BY_ENGINE):  # the engine logged and counted those
                log.exception("stream failed (request id %s)", request.state.request_id)
                request.app.state.metrics.record_error("internal")
            if isinstance(e, APIError):
                body = error_body(e.status, e.message, e.type, e.param, e.code)
            else:
                body = error_body(500, "internal server error", "internal_error", None, None)
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            for w in works:  # no-op for finished ones
                w.cancel(by_client=by_client)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
