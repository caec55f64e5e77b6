"""Bearer tokens: one for the admin API, one (optional) for health and metrics.

Only `Authorization: Bearer <token>` counts. A request that carries a token in its URL
(a parameter named as tokens are: `token`, `access_token`...) is refused even with a good
header: URLs end up in proxies' and browsers' histories; a wrong one there counts as a
guess. Tokens are compared in constant time, whole (never searched for inside a URL, whose
time would tell a guesser how much matched), and never logged.
"""

# No `from __future__ import annotations` here: FastAPI must see the guard's real
# annotations, which refer to a local `bearer`.
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from secumail.logs import log_event

log = logging.getLogger("secumail.gateway")

Guard = Callable[[Request, HTTPAuthorizationCredentials | None], Awaitable[None]]
# Query parameters that carry a token, as clients and tools name them.
URL_TOKEN_NAMES = frozenset({"token", "access_token", "bearer", "api_key", "apikey", "key",
                             "auth", "authorization", "admin_token", "metrics_token"})


class WrongTokens:
    """Wrong tokens each client address presented lately: past `limit` within `window`
    seconds, the client is refused (429) whatever it presents, until its oldest counted
    failure is `window` old. One count for the API's bearer tokens and the console's
    sign-in, so that guessing through one does not go on through the other. At most
    MAX_CLIENTS addresses are counted (the oldest forgotten): memory stays bounded
    whatever the number of addresses guessing. Behind a proxy every client has the
    proxy's address: a guesser then locks out everyone, for `window` seconds."""

    MAX_CLIENTS = 10_000

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, list[float]] = {}

    def wait(self, client: str, now: float) -> float:
        """Seconds before `client` may present a token again (0: now)."""
        recent = [t for t in self._failures.get(client, ()) if t > now - self.window]
        if recent:
            self._failures[client] = recent
        else:
            self._failures.pop(client, None)
        return recent[0] + self.window - now if len(recent) >= self.limit else 0.0

    def failed(self, client: str, now: float) -> None:
        self._failures.setdefault(client, []).append(now)
        del self._failures[client][:-self.limit]  # no more than the limit needs
        if len(self._failures) > self.MAX_CLIENTS:
            del self._failures[next(iter(self._failures))]


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


def too_many_wrong_tokens(client: str, wait: float, path: str) -> dict[str, str]:
    """Logs the 429 a guesser gets, and gives its Retry-After header."""
    log_event(log, "unauthorized", logging.WARNING, path=path, client=client,
              reason="too many wrong tokens", retry_after=f"{wait:.0f}")
    return {"Retry-After": f"{max(1, round(wait))}"}


def token_guard(token: SecretStr, scheme_name: str, description: str,
                wrong_tokens: WrongTokens) -> Guard:
    """A FastAPI dependency that lets a request through only with `token`."""
    expected = token.get_secret_value().encode()
    bearer = HTTPBearer(auto_error=False, scheme_name=scheme_name, description=description)

    async def guard(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> None:
        client, now = client_of(request), time.monotonic()
        if wait := wrong_tokens.wait(client, now):
            raise HTTPException(429, f"too many wrong tokens: try again in {wait:.0f} s",
                                too_many_wrong_tokens(client, wait, request.url.path))
        in_url = [value.encode() for name, value in parse_qsl(request.url.query)[:100]
                  if name.lower() in URL_TOKEN_NAMES]
        presented = credentials.credentials.encode() if credentials else b""
        wrong = (bool(presented) and not hmac.compare_digest(presented, expected)) or any(
            not hmac.compare_digest(value, expected) for value in in_url)
        if in_url or wrong or not presented:
            reason = "token in the URL" if in_url else "wrong" if wrong else "missing"
            if wrong:  # a guess; a request with no token (a page opened) is not one
                wrong_tokens.failed(client, now)
            log_event(log, "unauthorized", logging.WARNING, path=request.url.path,
                      client=client, reason=reason)
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
