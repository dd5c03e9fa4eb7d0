"""Typed errors raised by the engine and the request conversion. ``service.app`` maps them
to HTTP statuses and OpenAI error bodies in one place, by type."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    type = "internal_error"
    param: str | None = None
    code: str | None = None


class InvalidRequest(ServiceError):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, limit: int, requested: int = 0):
        extra = f" ({prompt_tokens} in the prompt, {requested} requested for the completion)" if requested else ""
        super().__init__(
            f"This model's maximum context length is {limit} tokens; the request has "
            f"{prompt_tokens + requested} tokens{extra}. Shorten the prompt or max_tokens.",
            param="messages",
        )
        self.prompt_tokens, self.limit = prompt_tokens, limit


class KVPoolExceeded(ContextLengthExceeded):
    """The request could never fit the KV cache's pool of blocks, even alone."""

    def __init__(self, prompt_tokens: int, limit: int, requested: int = 0):
        InvalidRequest.__init__(
            self,
            f"The request needs {prompt_tokens + requested} tokens of KV cache ({prompt_tokens} in the prompt, "
            f"{requested} requested for the completion), more than the {limit} the server's KV cache holds. "
            "Shorten the prompt or max_tokens.",
            param="messages",
        )
        self.prompt_tokens, self.limit = prompt_tokens, limit


class ModelNotFound(ServiceError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    param = "model"


class NotFound(ServiceError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Overloaded(ServiceError):
    status = 503
    type = "server_error"
    code = "overloaded"


class Draining(ServiceError):
    status = 503
    type = "server_error"
    code = "shutting_down"


class EngineFailed(ServiceError):
    status = 503
    type = "server_error"
    code = "engine_failed"


class Sleeping(ServiceError):
    status = 503
    type = "server_error"
    code = "sleeping"


class NotReady(ServiceError):
    status = 503
    type = "server_error"
    code = "not_ready"


class Unauthorized(ServiceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
