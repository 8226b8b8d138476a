"""Request ids, request counting, and one JSON error shape for every failure.

Every response carries ``X-Request-ID`` (the caller's, or a fresh one); error bodies repeat it,
so a 500 can be matched to its server log line. The error shape is OpenAI's
(``{"error": {"message", "type", ...}}``), which the ``openai`` client turns into its exceptions.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blendrag.errors import BlendRAGError
from blendrag.request import InvalidRequest

from .live_index import EmptyIndex, NotFound
from .metrics import Metrics
from .rag import EngineFailure

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    # invalid_request_error, authentication_error, not_found_error, service_unavailable, server_error
    type: str
    param: str | None = None
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "The request cannot be served (e.g. an unknown model)"},
    401: {"model": ErrorResponse, "description": "Missing or unknown API key (when keys are configured)"},
    422: {"model": ErrorResponse, "description": "The body failed validation"},
    500: {"model": ErrorResponse, "description": "The engine failed; quote the request_id"},
}


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def error_body(message: str, kind: str, rid: str, param: str | None = None) -> dict:
    return ErrorResponse(
        error=ErrorDetail(message=message, type=kind, param=param, request_id=rid)
    ).model_dump()


class RequestContext:
    """ASGI middleware: assigns the request id and counts each request by route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500  # unless a response starts: an exception escaped every handler

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The route template, not the raw path: one series per endpoint, not per document id.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc.errors())
        body = error_body(message, "invalid_request_error", request_id(request), param)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kinds = {401: "authentication_error", 404: "not_found_error"}
        kind = kinds.get(exc.status_code, "invalid_request_error")
        body = error_body(str(exc.detail), kind, request_id(request))
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    @app.exception_handler(BlendRAGError)
    async def user_error(request: Request, exc: BlendRAGError) -> JSONResponse:
        status, kind = _status_of(exc)
        param = exc.param if isinstance(exc, InvalidRequest) else None
        return JSONResponse(error_body(str(exc), kind, request_id(request), param), status)

    @app.exception_handler(EngineFailure)
    async def engine_failure(request: Request, exc: EngineFailure) -> JSONResponse:
        return JSONResponse(server_error_body(request_id(request)), 500)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in request %s", request_id(request), exc_info=exc)
        return JSONResponse(server_error_body(request_id(request)), 500)


def server_error_body(rid: str) -> dict:
    return error_body(
        f"internal error; the server log has details under request id {rid}", "server_error", rid
    )


def _status_of(exc: BlendRAGError) -> tuple[int, str]:
    if isinstance(exc, NotFound):
        return 404, "not_found_error"
    if isinstance(exc, EmptyIndex):
        return 503, "service_unavailable"
    if isinstance(exc, InvalidRequest) and exc.param is not None:
        return 422, "invalid_request_error"  # one field's value is refused, as schema validation does
    return 400, "invalid_request_error"


# pydantic's error types for a body that is missing or is not a JSON object.
_NOT_AN_OBJECT = ("missing", "model_attributes_type", "dict_type", "model_type")


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of a failed validation: each field's problem, or the body's own."""
    first = errors[0] if errors else {"type": "", "loc": ("body",)}
    if first["type"] == "json_invalid":  # its loc is a character offset, not a field
        return f"the body is not valid JSON: {first['ctx']['error']}", None
    if first["type"] in _NOT_AN_OBJECT and tuple(first["loc"]) == ("body",):
        return "the body must be a JSON object, sent as content-type application/json", None
    return "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors), _where(first["loc"])


def _where(loc: tuple) -> str:
    # ("body", "top_k") -> "top_k": every field lives in the body, saying so is noise.
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"
