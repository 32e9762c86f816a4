"""The one place where an error becomes an HTTP status and OpenAI's error envelope.

Every handler, middleware and stream formats its errors through `to_http` (a JSON response) or
`error_body` (the envelope alone, for a final SSE event), so a type means the same status
everywhere: `InvalidRequest`/`ContextTooLong` 400, `Unauthorized` 401, `ModelNotFound` 404,
`Overloaded` 429 + Retry-After, `EngineDead`/`ShuttingDown` 503, `EngineFailed` (the engine died with
the request in flight) 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.api.unicode_text import ERROR_TYPE as UNICODE_ERROR
from server.errors import EngineDead, Overloaded, PagedServeError

logger = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "overloaded_error",
    503: "service_unavailable",
}


class ShuttingDown(EngineDead):
    """The server drains after SIGTERM: it takes no new work, and unfinished work is cut at the deadline."""


class ClientGone(Exception):
    """The client disconnected before its response was ready; nothing can be sent any more."""


def failure_reason(exc: BaseException) -> str | None:
    """The `reason` label of pagedserve:request_failures_total for an error (None: not a failure)."""
    if isinstance(exc, ClientGone):
        return "disconnected"
    if isinstance(exc, ShuttingDown):
        return "draining"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, EngineDead):
        return "engine_error"
    status = to_http(exc)[0]
    if status == 401:
        return "unauthorized"
    return "validation" if 400 <= status < 500 else "engine_error"


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def to_http(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, envelope, headers) for any exception; unknown ones are 500 and never show internals."""
    if isinstance(exc, PagedServeError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else {}
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return exc.status_code, error_body(exc.message, exc.error_type, exc.status_code, exc.param), headers
    if isinstance(exc, ClientGone):  # nobody reads it; the status is for the access log
        return 499, error_body("The client closed the request.", "client_closed_request", 499), {}
    if isinstance(exc, RequestValidationError):
        message, param = describe_validation_errors(exc.errors())
        return 400, error_body(message, "invalid_request_error", 400, param), {}
    if isinstance(exc, HTTPException):
        status = exc.status_code
        message = {404: "Not found: no such route.", 413: "The request body is too large."}.get(status, str(exc.detail))
        headers = dict(exc.headers or {})
        return status, error_body(message, _HTTP_TYPES.get(status, "invalid_request_error"), status), headers
    return 500, error_body("Internal server error.", "internal_error", 500), {}


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = to_http(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, _, _ = to_http(exc)
        if not isinstance(exc, ClientGone):  # a disconnect is counted where the generation closes
            request.app.state.server.metrics.count_failure(failure_reason(exc))
        if status >= 500 and not isinstance(exc, PagedServeError):
            logger.error("Unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(exc)

    for exc_type in (PagedServeError, RequestValidationError, HTTPException, ClientGone, Exception):
        app.add_exception_handler(exc_type, handle)


def describe_validation_errors(errors: list[dict] | tuple) -> tuple[str, str | None]:
    """One readable message (and the offending parameter) out of pydantic's error list."""
    if not errors:
        return "The request is invalid.", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "malformed JSON")
        return f"The request body is not valid JSON: {detail}.", None
    if kind == "missing" and not loc:
        return "The request body is missing: send a JSON object.", None
    if kind == UNICODE_ERROR:  # raised before the fields, so its place is in ctx, not in loc
        return f"{first.get('msg', 'The text is not valid Unicode')}.", (first.get("ctx") or {}).get("param")
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "The request body must be a JSON object, sent with 'Content-Type: application/json'.", None
    param = _param_name(loc)
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}.", param
    if kind == "missing":
        return f"Missing required parameter: {param}.", param
    root = _union_root(loc)
    same = [e for e in errors if _union_root([str(p) for p in e.get("loc", ()) if p != "body"]) == root]
    if root is not None and len(same) > 1:  # a union: every accepted form failed
        param = _param_name(root)
        reasons = list(dict.fromkeys(e.get("msg", "invalid") for e in same))
        return f"Invalid value for {param}: it matches none of the accepted forms ({'; '.join(reasons[:4])}).", param
    more = len(errors) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"Invalid value for {param}: {first.get('msg', 'invalid')}{suffix}.", param


def _is_branch(part: str) -> bool:
    """A union branch name pydantic puts in `loc`, such as `str`, `list[str]` or `constrained-int`."""
    return "[" in part or part in _BRANCH_NAMES or part.startswith(("constrained-", "function-"))


_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "literal", "none"})


def _union_root(loc: list[str]) -> list[str] | None:
    """The location of the union a loc went through, or None when it went through none."""
    for i, part in enumerate(loc):
        if _is_branch(part):
            return loc[:i]
    return None


def _param_name(loc: list[str]) -> str:
    """`messages.0.content` -> `messages[0].content`; pydantic's union branch names are dropped."""
    out = ""
    for part in loc:
        if part.isdigit():
            out += f"[{part}]"
        elif _is_branch(part):
            continue
        else:
            out += f".{part}" if out else part
    return out or "body"
