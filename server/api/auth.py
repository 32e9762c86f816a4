"""Bearer API-key checks: on every route that serves the model, and on admin routes when asked."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.state import get_state
from server.errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="The server's --api-key (or PAGEDSERVE_API_KEY).")


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    key = get_state(request).api_key
    if key is None:
        return
    if credentials is None:
        raise Unauthorized("Missing API key: send the header 'Authorization: Bearer <key>'.")
    if not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
        raise Unauthorized("Incorrect API key.")


def require_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """For /v1/*, /tokenize, /detokenize and the TGI routes."""
    _check(request, credentials)


def require_admin_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """For /health, /ready, /metrics and /version: open unless --auth-admin-routes."""
    if get_state(request).config.auth_admin_routes:
        _check(request, credentials)
