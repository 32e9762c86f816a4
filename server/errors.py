"""Error types that cross module boundaries. The API maps each to one HTTP status in one place."""


class PagedServeError(Exception):
    """Base of every error a user can see. `param` names the offending field when there is one."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(PagedServeError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    pass


class Unauthorized(PagedServeError):
    status_code = 401
    error_type = "authentication_error"


class ModelNotFound(PagedServeError):
    status_code = 404
    error_type = "not_found_error"


class Overloaded(PagedServeError):
    status_code = 429
    error_type = "overloaded_error"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDead(PagedServeError):
    """The engine is not running (it died or stopped): new requests get 503."""

    status_code = 503
    error_type = "service_unavailable"


class EngineFailed(PagedServeError):
    """The engine loop died while the request was in flight: 500, and the server exits to be restarted."""

    status_code = 500
    error_type = "internal_error"


class ConfigError(ValueError):
    """A bad flag, model directory or checkpoint: start-up stops with this message."""
