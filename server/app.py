"""build_app(): the FastAPI app; its lifespan loads model, bank and prompt KV off the event loop."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idp_core import paths
from idp_core.bank import PromptBank
from idp_core.build import build_engine
from idp_core.config import GenConfig, SelectConfig
from idp_core.generate import GenRequest
from idp_core.model import load_model
from server.errors import error_body, install_handlers
from server.metrics import Metrics
from server.routes import router
from server.scheduler import Scheduler
from server.settings import Settings
from server.state import ServingState

log = logging.getLogger(__name__)

_BUILD_DEFAULT = (
    "import logging; from idp_core.lab.artefacts import ensure_default_model; "
    "logging.basicConfig(level=logging.INFO, "
    "format='%(asctime)s %(levelname)s %(name)s: %(message)s'); ensure_default_model()"
)


def resolve_sources(settings: Settings) -> tuple[str | None, str | None]:
    """(model source, bank folder) after defaults; fails fast on paths that do not exist."""
    model: str | None = settings.model or None
    if model is not None and not Path(model).exists():
        raise FileNotFoundError(f"model not found: {model}")
    if settings.lora:
        if not Path(settings.lora, "adapter_config.json").is_file():
            raise FileNotFoundError(f"LoRA adapter not found (no adapter_config.json): "
                                    f"{settings.lora}")
        return model, None
    if settings.bank == "none":
        return model, None
    if settings.bank:
        return model, settings.bank
    return model, str(paths.DEFAULT_BANK) if model is None else None


def default_model() -> Path:
    """The default compressed model, built on first use by the lab in a child process.

    The compressor stays out of the server's imports; the build logs to this process's output.
    """
    if not paths.default_model_built():
        log.info("the default model is not built yet: building it with idp_core.lab.artefacts")
        path = os.pathsep.join(filter(None, [str(paths.REPO), os.environ.get("PYTHONPATH")]))
        subprocess.run([sys.executable, "-c", _BUILD_DEFAULT], check=True,
                       env={**os.environ, "PYTHONPATH": path})  # this same idp_core
    return paths.DEFAULT_MODEL_DIR


def load_state(settings: Settings, metrics_registry: CollectorRegistry | None = None, *,
               metrics_class: type[Metrics] = Metrics) -> ServingState:
    """Load the model once, pin the prompt KV, warm up, and start the engine thread.

    `metrics_class` is Metrics or a subclass that also exports elsewhere (a Ray Serve replica's
    ReplicaMetrics, server/ray_app.py).
    """
    model_source, bank_dir = resolve_sources(settings)
    bank = PromptBank.load(bank_dir) if bank_dir else None  # fast: fail before the model
    if model_source is None:
        model_source = str(default_model())
    lm = load_model(model_source, dtype=settings.dtype, device=settings.device,
                    weights=settings.weights)
    mode = "lora" if settings.lora else "idp" if bank is not None else "none"
    engine = build_engine(lm, bank=bank, lora=settings.lora or None,
                          select_config=SelectConfig(score=settings.selection_score,
                                                     align=settings.selection_align,
                                                     rule=settings.selection_rule),
                          strict_fingerprint=settings.strict_fingerprint, origin=bank_dir or "",
                          batch_invariant=settings.batch_invariant)
    engine.generate([GenRequest([lm.tokenizer.eos_token_id or 0], GenConfig(max_tokens=2))])
    name = settings.served_model_name or lm.name
    metrics = metrics_class(name, mode, metrics_registry)
    scheduler = Scheduler(engine, metrics, max_batch_size=settings.max_batch_size,
                          max_batch_tokens=settings.max_batch_tokens,
                          max_queue=settings.max_queue,
                          static=settings.scheduling == "static",
                          fault_token_id=settings.fault_token_id)
    scheduler.start()
    return ServingState(lm, engine, scheduler, bank, name, mode, int(time.time()))


def build_app(settings: Settings, *, state: ServingState | None = None) -> FastAPI:
    """The app; /health answers 503 until the background warm-up has finished.

    With `state` (already loaded, as a Ray Serve replica does before it takes traffic) there is
    no warm-up: the app serves it at once and stops its scheduler on shutdown.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state is not None:
            app.state.metrics, app.state.serving = state.scheduler.metrics, state
            yield
            state.scheduler.stop()
            return

        def warm_up() -> None:
            try:
                state = load_state(settings)
            except Exception as e:  # one clear line, then a non-zero exit
                log.error("cannot start: %s: %s", type(e).__name__, e)
                logging.shutdown()
                os._exit(1)
            app.state.metrics = state.scheduler.metrics
            app.state.serving = state
            log.info("ready: %s (%s) on %s", state.model_name, state.mode, state.lm.device)

        app.state.serving = None
        app.state.metrics = None
        threading.Thread(target=warm_up, name="idp-warmup", daemon=True).start()
        yield
        if app.state.serving is not None:
            app.state.serving.scheduler.stop()

    app = FastAPI(title="IDP inference server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_handlers(app)
    app.include_router(router)
    app.add_middleware(GuardMiddleware, settings=settings)  # type: ignore[arg-type]
    return app


class GuardMiddleware:
    """Request ids, optional API key (constant-time), and the request body limit."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.key = settings.api_key.encode()
        self.metrics_open = not settings.metrics_require_key
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        path = scope["path"]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        if self.key and path != "/health" and not (path == "/metrics" and self.metrics_open):
            given = headers.get("authorization", "")
            token = given[7:].encode() if given.lower().startswith("bearer ") else b""
            if not hmac.compare_digest(token, self.key):
                await _reject(send_with_id, 401, "missing or invalid API key",
                              "authentication_error", "invalid_api_key")
                return
        length = headers.get("content-length")
        too_large = length is not None and (not length.isdigit() or int(length) > self.max_body)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # chunked upload: read it here, up to the limit, and replay it to the app
            body, more = b"", True
            while more and len(body) <= self.max_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
            too_large = len(body) > self.max_body
            receive = _replay(body, receive)
        if too_large:
            await _reject(send_with_id, 413, f"request body over {self.max_body} bytes",
                          "invalid_request_error", "request_too_large")
            return
        scope.setdefault("state", {})["request_id"] = request_id
        await self.app(scope, receive, send_with_id)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields an already-read body once, then defers to the client's."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _reject(send: Send, status: int, message: str, type_: str, code: str) -> None:
    body = json.dumps(error_body(status, message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
