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


class ConsoleSessions:
    """The console's sign-in: a cookie `EXPIRY.MAC` (HMAC-SHA256 under the admin token, so
    a new token ends every session) and, for each session, a CSRF token its forms carry.
    Nothing is stored: a gateway restart keeps sessions, a token change ends them."""

    COOKIE = "secumail_console"
    LIFETIME = 8 * 3600

    def __init__(self, token: SecretStr, secure_cookie: bool) -> None:
        self._key = token.get_secret_value().encode()
        self.secure_cookie = secure_cookie

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), "sha256").hexdigest()

    def token_matches(self, presented: str) -> bool:
        return bool(self._key) and hmac.compare_digest(presented.encode(), self._key)

    def new_session(self, now: float) -> str:
        expires = str(int(now) + self.LIFETIME)
        return f"{expires}.{self._mac('session', expires)}"

    def valid(self, cookie: str | None, now: float) -> bool:
        expires, _, mac = (cookie or "").partition(".")
        return (expires.isdigit() and int(expires) > now
                and hmac.compare_digest(mac.encode(), self._mac("session", expires).encode()))

    def csrf(self, cookie: str) -> str:
        return self._mac("csrf", cookie)

    def csrf_matches(self, cookie: str, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.csrf(cookie).encode())
