"""ServingState: what the handlers need once warm-up is done, and how a handler gets it."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from idp_core.bank import PromptBank
from idp_core.generate import Engine
from idp_core.model import LoadedModel
from server.errors import NotReady
from server.scheduler import Scheduler


@dataclass
class ServingState:
    """Everything the handlers need once warm-up is done."""

    lm: LoadedModel
    engine: Engine
    scheduler: Scheduler
    bank: PromptBank | None
    model_name: str
    mode: str  # idp | lora | none
    started: int


def serving_state(request: Request) -> ServingState:
    """The loaded model, engine and bank; 503 while warming up."""
    state: ServingState | None = request.app.state.serving
    if state is None:
        raise NotReady("the model is still loading; retry when /health answers 200",
                       headers={"Retry-After": "5"})
    return state
