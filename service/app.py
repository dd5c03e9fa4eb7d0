"""The Litestar app: the routes of ``service.routes``, errors mapped to OpenAI's body (one
handler per error type), API-key auth, CORS and an offline Swagger UI.

The state (settings, and the engine once loaded) is set on the app by the caller and injected
into handlers with ``Provide``; there are no module globals.
"""

from __future__ import annotations

import hmac
import logging
import re
from pathlib import Path

import msgspec
from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

from service import protocol as p
from service.errors import ServiceError, Unauthorized
from service import protocol_messages
from service.routes import adapters, embeddings, interactive, messages, openai, ops, responses, rollout
from service.routes.common import Disconnected, ServerSettings, State

log = logging.getLogger(__name__)

__all__ = ["ServerSettings", "State", "create_app"]

ROUTES = [openai.list_models, openai.retrieve_model, openai.chat_completions, openai.completions,
          interactive.chat_interactive, ops.tokenize, ops.detokenize, ops.encode, ops.health, ops.metrics, ops.loads,
          responses.create_response, responses.get_response, responses.delete_response,
          responses.list_input_items, messages.create_message, messages.count_tokens, embeddings.embeddings,
          adapters.load_lora_adapter, adapters.unload_lora_adapter, *rollout.ROUTES]


# -- errors: one handler per type --------------------------------------------------------------


def _error_response(request: Request, status: int, message: str, type_: str, param: str | None = None,
                    code: str | None = None) -> Response:
    """OpenAI's error body, or Anthropic's on the Messages routes and to Anthropic's clients
    (their SDK reads that one)."""
    if request.url.path.startswith("/v1/messages") or "anthropic-version" in request.headers:
        body = protocol_messages.error_body(status, message)
    else:
        body = p.ErrorResponse(error=p.ErrorDetail(message=message, type=type_, param=param, code=code))
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json")


def _service_error(request: Request, exc: ServiceError) -> Response:
    return _error_response(request, exc.status, str(exc), exc.type, exc.param, exc.code)


def _disconnected(request: Request, exc: Disconnected) -> Response:
    # Nobody is listening; the log says what happened.
    log.info("client left before the answer to %s was ready; request aborted", request.url.path)
    return _error_response(request, 499, "client closed the request", "invalid_request_error")


def _validation_error(request: Request, exc: ValidationException) -> Response:
    extra = exc.extra if isinstance(exc.extra, list) else []
    detail = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in extra)
    param = None
    for e in extra:
        if isinstance(e, dict) and e.get("key"):
            param = str(e["key"]).removeprefix("$.")
            break
    unknown = re.search(r"unknown field `([^`]+)`", detail)
    if unknown:  # the field itself, wherever it sits ("$.messages[0].x" -> "messages[0].x")
        at = re.search(r"at `\$\.?([^`]*)`", detail)
        param = ".".join(x for x in ((at.group(1) if at else ""), unknown.group(1)) if x)
    msg = f"{exc.detail}: {detail}" if detail else str(exc.detail)
    return _error_response(request, 400, msg, "invalid_request_error", param)


def _no_route(request: Request, exc: Exception) -> Response:
    return _error_response(request, 404, f"no route {request.method} {request.url.path}", "invalid_request_error")


def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error_response(request, exc.status_code, str(exc.detail), "invalid_request_error")


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return _error_response(request, 500, "internal server error", "internal_error")


EXCEPTION_HANDLERS = {
    ServiceError: _service_error,
    Disconnected: _disconnected,
    ValidationException: _validation_error,
    NotFoundException: _no_route,
    404: _no_route,
    405: _http_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}


# -- requests, auth, app -----------------------------------------------------------------------


class _Request(Request):
    async def json(self):
        # msgspec decodes nested arrays and objects recursively: a body nested deep enough
        # (within the size limit) exhausts the stack. That is the client's malformed input.
        try:
            return await super().json()
        except RecursionError:
            raise ValidationException("JSON is malformed: the body nests too deeply") from None



def _auth_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    settings: ServerSettings = connection.app.state.xla.settings
    if not settings.api_keys or handler.opt.get("public"):
        return
    header = connection.headers.get("authorization", "")
    # Bearer as OpenAI's clients send it, or x-api-key as Anthropic's do.
    token = header[7:] if header.lower().startswith("bearer ") else connection.headers.get("x-api-key", "")
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in settings.api_keys):
        raise Unauthorized("invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')")


def _swagger_static():
    import swagger_ui_bundle

    return create_static_files_router(path="/static/swagger",
                                      directories=[Path(swagger_ui_bundle.swagger_ui_path)],
                                      opt={"public": True}, include_in_schema=False)


def create_app(ctx: State, lifespan: list | None = None) -> Litestar:
    settings = ctx.settings
    cors = None
    if settings.allow_origins:
        cors = CORSConfig(allow_origins=list(settings.allow_origins),
                          allow_credentials=settings.allow_credentials,
                          allow_methods=list(settings.allow_methods),
                          allow_headers=list(settings.allow_headers))
    openapi = OpenAPIConfig(
        title="xlaserve", version="0.1.0", path="/",
        render_plugins=[SwaggerRenderPlugin(path="/", js_url="/static/swagger/swagger-ui-bundle.js",
                                            css_url="/static/swagger/swagger-ui.css",
                                            standalone_preset_js_url="/static/swagger/swagger-ui-standalone-preset.js",
                                            favicon="<link rel='icon' type='image/png' "
                                                    "href='/static/swagger/favicon-32x32.png'>")],
    )
    app = Litestar(
        route_handlers=[*ROUTES, _swagger_static()],
        dependencies={"ctx": Provide(lambda: app.state.xla, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        guards=[_auth_guard],
        cors_config=cors,
        openapi_config=openapi,
        lifespan=lifespan or [],
        request_max_body_size=8 * 1024 * 1024,
        request_class=_Request,
    )
    app.state.xla = ctx
    return app
