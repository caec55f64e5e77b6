"""Bearer tokens: one for the admin API, one (optional) for health and metrics.

Only `Authorization: Bearer <token>` counts. A request that carries the token in its URL
is refused even with a good header: URLs end up in proxies' and browsers' histories.
Tokens are compared in constant time and never logged.
"""

# No `from __future__ import annotations` here: FastAPI must see the guard's real
# annotations, which refer to a local `bearer`.
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated
from urllib.parse import unquote_plus

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from secumail.logs import log_event

log = logging.getLogger("secumail.gateway")

Guard = Callable[[Request, HTTPAuthorizationCredentials | None], Awaitable[None]]


def token_guard(token: SecretStr, scheme_name: str, description: str) -> Guard:
    """A FastAPI dependency that lets a request through only with `token`."""
    expected = token.get_secret_value().encode()
    bearer = HTTPBearer(auto_error=False, scheme_name=scheme_name, description=description)

    async def guard(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> None:
        in_url = expected in unquote_plus(request.url.query).encode()
        presented = credentials.credentials.encode() if credentials else b""
        if in_url or not hmac.compare_digest(presented, expected):
            reason = "token in the URL" if in_url else "missing" if not presented else "wrong"
            log_event(log, "unauthorized", logging.WARNING, path=request.url.path,
                      client=request.client.host if request.client else "?", reason=reason)
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return guard
