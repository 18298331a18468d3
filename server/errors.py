"""Domain exceptions and the handlers that turn them into OpenAI-shaped error bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.headers = message, param, headers or {}


class BadRequest(APIError):
    pass


class UnknownModel(APIError):
    status, code = 404, "model_not_found"


class QueueFull(APIError):
    status, type, code = 503, "server_overloaded", "queue_full"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ServerDraining(APIError):
    status, type, code = 503, "server_unavailable", "shutting_down"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "5"})


class NotReady(APIError):
    status, type, code = 503, "server_unavailable", "warming_up"


class ClientDisconnected(APIError):
    status, type, code = 499, "client_disconnected", "client_disconnected"


class Timeout(APIError):
    status, type, code = 504, "timeout", "request_timeout"


class OutOfMemory(APIError):
    status, type, code = 503, "server_overloaded", "out_of_memory"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"the accelerator ran out of memory (request id {request_id}); retry "
                         "with a shorter prompt or later", headers={"Retry-After": "1"})


class EngineStepError(APIError):
    status, type, code = 500, "internal_error", "engine_error"

    def __init__(self, request_id: str, cause: Exception) -> None:
        super().__init__(f"internal error while generating (request id {request_id})")
        self.__cause__ = cause


# Raised where the engine thread (server/scheduler.py) has logged and counted them already.
COUNTED_BY_ENGINE = (ClientDisconnected, EngineStepError, OutOfMemory)


def error_body(status: int, message: str, type_: str, param: str | None,
               code: str | None) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status, exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


def install_handlers(app: FastAPI) -> None:
    """Register one handler per error kind; each failed request is counted in metrics."""

    def count(request: Request, kind: str) -> None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.record_error(kind)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if not isinstance(exc, COUNTED_BY_ENGINE):
            count(request, exc.code or exc.type)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(request, "validation")
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if loc:
            message = f"{'.'.join(loc)}: {message}"
        return JSONResponse(
            error_body(400, message, "invalid_request_error", ".".join(loc) or None, None),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(request, f"http_{exc.status_code}")
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), "invalid_request_error", None, None),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        log.exception("unhandled error (request id %s)", request_id)
        count(request, "internal")
        return JSONResponse(
            error_body(500, f"internal server error (request id {request_id})",
                       "internal_error", None, None),
            status_code=500,
        )
