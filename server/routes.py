"""Thin HTTP handlers: each parses its body, validates it (server/inputs.py), submits to the
scheduler and answers with a response built in server/responses.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import BadRequest, NotReady
from server.inputs import (
    chat_ids,
    check_model,
    check_stops,
    check_vocab,
    encode,
    make_request,
    prompt_length,
)
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from server.responses import (
    chat_response,
    completion_response,
    stream_chat,
    stream_completions,
)
from server.state import serving_state
from server.streaming import collect_all, sse

router = APIRouter()


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
        {"name": n, "kind": s.bank.kind, "length": length, "selected": counts.get(n, 0)}
        for n, length in zip(s.bank.names, s.bank.lengths, strict=True)
    ]
    return {"object": "list", "data": data,
            "rule": None if s.bank is None else s.engine.selection_rule,
            "training": None if s.bank is None
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
    works = s.scheduler.submit(reqs, stream=body.stream)
    if body.stream:
        return sse(stream_completions(s, works, rid, created), works, request)
    results = await collect_all(s, works, request)
    return JSONResponse(completion_response(s, rid, created, results).model_dump())


# ---- chat -----------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    s = serving_state(request)
    check_model(s, body.model)
    check_stops(request, body.stop_strings())
    ids = await asyncio.to_thread(chat_ids, s, [m.model_dump() for m in body.messages], True)
    default_max = max(1, min(512, s.lm.max_context - len(ids) - prompt_length(
        s, body.prompt_selection)))
    req = make_request(s, ids, body.to_gen_config(default_max), body.prompt_selection, request)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    works = s.scheduler.submit([req], stream=body.stream)
    if body.stream:
        return sse(stream_chat(s, works[0], rid, created), works, request)
    r = (await collect_all(s, works, request))[0]
    return JSONResponse(chat_response(s, rid, created, r).model_dump())
