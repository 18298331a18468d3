"""From an HTTP body to validated core requests: tokenizing, the chat template, and every
limit checked before a request is queued (never in the model loop)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import Request
from jinja2 import TemplateError

from idp_core.config import GenConfig
from idp_core.generate import GenRequest
from server.errors import BadRequest, UnknownModel
from server.state import ServingState

log = logging.getLogger(__name__)


def encode(s: ServingState, text: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize off the event loop (callers use asyncio.to_thread): long prompts take a while."""
    return list(s.lm.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


def chat_ids(s: ServingState, messages: list[dict[str, Any]],
             add_generation_prompt: bool) -> list[int]:
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


def check_model(s: ServingState, model: str | None) -> None:
    if model and model != s.model_name:
        raise UnknownModel(f"model {model!r} is not served here; this server serves "
                           f"{s.model_name!r}", param="model")


def check_vocab(s: ServingState, ids: list[int], param: str) -> None:
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


def prompt_length(s: ServingState, selection: str) -> int:
    try:
        return int(s.engine.prefix_length(selection))
    except KeyError as e:
        raise BadRequest(str(e.args[0]), param="prompt_selection") from None


def make_request(s: ServingState, ids: list[int], config: GenConfig, selection: str,
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
