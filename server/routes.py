"""Thin HTTP handlers: parse, validate against the engine's limits, submit, format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from idp_core.config import GenConfig
from idp_core.generate import GenRequest, GenResult, TokenLogprob
from server.errors import (
    BadRequest,
    ClientDisconnected,
    EngineStepError,
    NotReady,
    Timeout,
    UnknownModel,
)
from server.protocol import (
    ChatCompletionRequest,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    TokenizeRequest,
    Usage,
)
from server.scheduler import Submission, Update

router = APIRouter()
log = logging.getLogger(__name__)


def serving_state(request: Request) -> Any:
    """The loaded model, engine and bank (ServingState); 503 while warming up."""
    state = request.app.state.serving
    if state is None:
        raise NotReady("the model is still loading; retry when /health answers 200",
                       headers={"Retry-After": "5"})
    return state


# ---- health, metrics, models ------------------------------------------------------------
@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state.serving
    if state is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if state.scheduler.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok", "mode": state.mode})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    if m is None:
        raise NotReady("metrics are available once the model is loaded")
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    s = serving_state(request)
    card = {"id": s.model_name, "object": "model", "created": s.started, "owned_by": "idp",
            "max_model_len": s.lm.max_context, "mode": s.mode, "loaded": s.lm.describe()}
    return {"object": "list", "data": [card]}


@router.get("/v1/prompts")
async def prompts(request: Request) -> dict[str, Any]:
    s = serving_state(request)
    counts = s.scheduler.selection_counts
    data = [] if s.bank is None else [
        {"name": n, "length": length, "selected": counts.get(n, 0)}
        for n, length in zip(s.bank.names, s.bank.lengths, strict=True)
    ]
    return {"object": "list", "data": data, "training": None if s.bank is None
            else {k: v for k, v in s.bank.training.items() if k != "loss_curve"}}


# ---- tokenizer endpoints (the shapes lm-eval and vLLM clients probe) ----------------------
@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    s = serving_state(request)
    check_model(s, body.model)
    if body.messages is not None:
        ids = await asyncio.to_thread(chat_ids, s, [m.model_dump() for m in body.messages],
                                      body.add_generation_prompt)
    elif body.prompt is not None:
        ids = await asyncio.to_thread(encode, s, body.prompt, body.add_special_tokens)
    else:
        raise BadRequest("give 'prompt' or 'messages'", param="prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": s.lm.max_context}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    s = serving_state(request)
    check_model(s, body.model)
    check_vocab(s, body.tokens, "tokens")
    return {"prompt": s.lm.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    s = serving_state(request)
    tok = s.lm.tokenizer
    return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token,
            "bos_token": tok.bos_token, "pad_token": tok.pad_token,
            "model_max_length": s.lm.max_context, "vocab_size": len(tok),
            "chat_template": tok.chat_template}


# ---- completions ------------------------------------------------------------------------
@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    s = serving_state(request)
    check_model(s, body.model)
    check_stops(request, body.stop_strings())
    config = body.to_gen_config()
    prompts = body.prompts()
    if not prompts:
        raise BadRequest("prompt must not be empty", param="prompt")
    token_rows = [p if isinstance(p, list) else await asyncio.to_thread(encode, s, p)
                  for p in prompts]
    reqs = [make_request(s, ids, config, body.prompt_selection, request) for ids in token_rows]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    works = submit_all(s, reqs, stream=body.stream)
    if body.stream:
        return sse(stream_completions(s, works, rid, created), request)
    results = await collect_all(s, works, request)
    choices = [completion_choice(s, i, r) for i, r in enumerate(results)]
    return JSONResponse(CompletionResponse(
        id=rid, created=created, model=s.model_name, choices=choices, usage=usage(results),
    ).model_dump())


async def stream_completions(s: Any, works: list[Submission], rid: str,
                             created: int) -> AsyncIterator[dict[str, Any]]:
    for index, work in enumerate(works):  # echoed prompts come first, as a client reads them
        if work.request.config.echo:
            choice = {"index": index, "text": s.lm.tokenizer.decode(work.request.input_ids),
                      "finish_reason": None, "logprobs": None}
            yield {"id": rid, "object": "text_completion", "created": created,
                   "model": s.model_name, "choices": [choice]}
    async for index, update in merge_streams(s, works):
        choice: dict[str, Any] = {"index": index, "text": update.text, "finish_reason": None,
                                  "logprobs": None}
        if update.logprobs:
            choice["logprobs"] = logprobs_block(s, update.logprobs).model_dump()
        if update.result is not None:
            r = update.result
            choice.update(finish_reason=r.finish_reason, prompt_used=r.prompt_used,
                          selection_scores=r.scores)
        yield {"id": rid, "object": "text_completion", "created": created,
               "model": s.model_name, "choices": [choice]}


def completion_choice(s: Any, index: int, r: GenResult) -> CompletionChoice:
    text, lps = r.text, None
    if r.output_logprobs is not None:  # echo alone returns text, logprobs need `logprobs`
        entries: list[TokenLogprob | None] = []
        if r.prompt_logprobs is not None:
            entries += r.prompt_logprobs
        entries += r.output_logprobs or []
        ids = (r.input_ids if r.prompt_logprobs is not None else []) + r.output_ids
        lps = logprobs_block(s, entries, ids)
    if r.prompt_logprobs is not None:
        text = s.lm.tokenizer.decode(r.input_ids) + text
    return CompletionChoice(index=index, text=text, logprobs=lps, finish_reason=r.finish_reason,
                            prompt_used=r.prompt_used, selection_scores=r.scores)


def logprobs_block(s: Any, entries: list[Any], ids: list[int] | None = None
                   ) -> CompletionLogprobs:
    """OpenAI completions logprobs: the first echoed token has None (nothing predicts it)."""
    tok = s.lm.tokenizer
    ids = ids if ids is not None else [e.token_id for e in entries]
    block, offset = CompletionLogprobs(), 0
    for token_id, e in zip(ids, entries, strict=True):
        piece = tok.decode([token_id])
        block.tokens.append(piece)
        block.text_offset.append(offset)
        offset += len(piece)
        block.token_logprobs.append(None if e is None else e.logprob)
        block.top_logprobs.append(
            None if e is None else {tok.decode([i]): lp for i, lp in e.top}
        )
    return block


# ---- chat -----------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    s = serving_state(request)
    check_model(s, body.model)
    check_stops(request, body.stop_strings())
    ids = await asyncio.to_thread(chat_ids, s, [m.model_dump() for m in body.messages], True)
    default_max = max(1, min(512, s.lm.max_context - len(ids) - prefix_length(
        s, body.prompt_selection)))
    req = make_request(s, ids, body.to_gen_config(default_max), body.prompt_selection, request)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    works = submit_all(s, [req], stream=body.stream)
    if body.stream:
        return sse(stream_chat(s, works[0], rid, created), request)
    r = (await collect_all(s, works, request))[0]
    choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
              "logprobs": chat_logprobs(s, r.output_logprobs), "finish_reason": r.finish_reason,
              "prompt_used": r.prompt_used, "selection_scores": r.scores}
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                         "model": s.model_name, "choices": [choice],
                         "usage": usage([r]).model_dump()})


async def stream_chat(s: Any, work: Submission, rid: str,
                      created: int) -> AsyncIterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": None, **extra}
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": s.model_name, "choices": [choice]}

    yield chunk({"role": "assistant", "content": ""})
    async for _, update in merge_streams(s, [work]):
        extra: dict[str, Any] = {}
        if update.logprobs:
            extra["logprobs"] = chat_logprobs(s, update.logprobs)
        if update.text or update.logprobs:
            yield chunk({"content": update.text}, **extra)
        if update.result is not None:
            yield chunk({}, finish_reason=update.result.finish_reason,
                        prompt_used=update.result.prompt_used,
                        selection_scores=update.result.scores)


def chat_logprobs(s: Any, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    tok = s.lm.tokenizer

    def item(token_id: int, lp: float) -> dict[str, Any]:
        text = tok.decode([token_id])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]}


def encode(s: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize off the event loop (callers use asyncio.to_thread): long prompts take a while."""
    return list(s.lm.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


def chat_ids(s: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    tok = s.lm.tokenizer
    if not tok.chat_template:
        raise BadRequest("this model has no chat template; use /v1/completions",
                         param="messages")
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                       tokenize=False)
    except (ValueError, TypeError, TemplateError) as e:
        raise BadRequest(f"cannot apply the chat template: {e}", param="messages") from None
    return tok(text, add_special_tokens=False).input_ids


# ---- shared helpers ---------------------------------------------------------------------
def check_model(s: Any, model: str | None) -> None:
    if model and model != s.model_name:
        raise UnknownModel(f"model {model!r} is not served here; this server serves "
                           f"{s.model_name!r}", param="model")


def check_vocab(s: Any, ids: list[int], param: str) -> None:
    vocab = s.engine.vocab_size
    bad = [t for t in ids if t >= vocab]
    if bad:
        raise BadRequest(f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}", param=param)


def check_stops(request: Request, stops: tuple[str, ...]) -> None:
    limit = request.app.state.settings.max_stop_strings
    if len(stops) > limit:
        raise BadRequest(f"at most {limit} stop strings, got {len(stops)}", param="stop")
    if any(not x for x in stops):
        raise BadRequest("stop strings must not be empty", param="stop")


def prefix_length(s: Any, selection: str) -> int:
    try:
        return int(s.engine.prefix_length(selection))
    except KeyError as e:
        raise BadRequest(str(e.args[0]), param="prompt_selection") from None


def make_request(s: Any, ids: list[int], config: GenConfig, selection: str,
                 request: Request) -> GenRequest:
    """Build and validate a core request; limits are checked here, never in the model loop."""
    req = GenRequest(ids, config, selection,
                     request_id=f"{request.scope['state']['request_id']}-{uuid.uuid4().hex[:8]}")
    if request.app.state.settings.log_prompts:
        log.info("request %s: prompt %r", req.request_id, s.lm.tokenizer.decode(ids))
    else:  # prompt text stays out of the logs unless the operator turns it on
        log.info("request %s: %d prompt tokens, max_tokens %d, selection %s", req.request_id,
                 len(ids), config.max_tokens, selection)
    try:
        s.engine.validate(req)
    except KeyError as e:
        raise BadRequest(str(e.args[0]), param="prompt_selection") from None
    except ValueError as e:
        param = "max_tokens" if "max_tokens" in str(e) and len(ids) < s.lm.max_context else (
            "prompt")
        raise BadRequest(str(e), param=param) from None
    return req


def submit_all(s: Any, reqs: list[GenRequest], *, stream: bool) -> list[Submission]:
    """Queue every prompt of a request, or none: a refusal (503) comes before any response."""
    works: list[Submission] = []
    try:
        for r in reqs:
            works.append(s.scheduler.submit(r, stream=stream))
    except Exception:
        for w in works:
            w.cancelled = True
        raise
    return works


async def collect_all(s: Any, works: list[Submission], request: Request) -> list[GenResult]:
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

    task = asyncio.create_task(asyncio.wait_for(
        asyncio.gather(*(result(w) for w in works)), timeout_s))
    gone = asyncio.create_task(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left: cancelling frees its queue or batch slots
            task.cancel()
        for w in works:  # no-op for finished ones; stops siblings of a failed prompt
            w.cancelled = True
    if not task.done() or task.cancelled():
        raise ClientDisconnected("the client disconnected")
    try:
        return list(task.result())
    except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11 on
        raise Timeout(f"no result within {timeout_s} s") from None


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge_streams(s: Any, works: list[Submission]
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
        for w in works:  # no-op for finished ones; frees the slots of the rest
            w.cancelled = True


def sse(events: AsyncIterator[dict[str, Any]], request: Request) -> StreamingResponse:
    """Server-sent events ending in `data: [DONE]`; an error mid-stream becomes an error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:  # headers are sent: report in-band, as OpenAI does
            if not isinstance(e, EngineStepError):  # the engine logged and counted those
                log.exception("stream failed (request id %s)", request.state.request_id)
                request.app.state.metrics.record_error("internal")
            message = getattr(e, "message", "internal server error")
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'internal_error', 'param': None, 'code': None}})}\n\n"  # noqa: E501
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def usage(results: list[GenResult]) -> Usage:
    prompt = sum(len(r.input_ids) for r in results)
    completion = sum(len(r.output_ids) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)
