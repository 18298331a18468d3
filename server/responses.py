"""OpenAI-shaped responses from core results: completions and chat, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from idp_core.generate import GenResult, TokenLogprob
from server.protocol import (
    ChatChoice,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)
from server.scheduler import Submission
from server.state import ServingState
from server.streaming import merge_streams


def completion_response(s: ServingState, rid: str, created: int,
                        results: list[GenResult]) -> CompletionResponse:
    choices = [completion_choice(s, i, r) for i, r in enumerate(results)]
    return CompletionResponse(id=rid, created=created, model=s.model_name, choices=choices,
                              usage=usage(results))


async def stream_completions(s: ServingState, works: list[Submission], rid: str,
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


def completion_choice(s: ServingState, index: int, r: GenResult) -> CompletionChoice:
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


def logprobs_block(s: ServingState, entries: list[Any], ids: list[int] | None = None
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


def chat_response(s: ServingState, rid: str, created: int,
                  r: GenResult) -> ChatCompletionResponse:
    choice = ChatChoice(index=0, message=ChatResponseMessage(content=r.text),
                        logprobs=chat_logprobs(s, r.output_logprobs),
                        finish_reason=r.finish_reason, prompt_used=r.prompt_used,
                        selection_scores=r.scores)
    return ChatCompletionResponse(id=rid, created=created, model=s.model_name,
                                  choices=[choice], usage=usage([r]))


async def stream_chat(s: ServingState, work: Submission, rid: str,
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


def chat_logprobs(s: ServingState, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    tok = s.lm.tokenizer

    def item(token_id: int, lp: float) -> dict[str, Any]:
        text = tok.decode([token_id])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]}


def usage(results: list[GenResult]) -> Usage:
    prompt = sum(len(r.input_ids) for r in results)
    completion = sum(len(r.output_ids) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)
