"""The optional guard in front of every endpoint: a bearer token or basic-auth users.

Off when ``gateway.auth.token`` and ``gateway.auth.users`` are both unset. Credentials are
compared in constant time; a refusal is 401 JSON with a ``WWW-Authenticate`` challenge
(Basic when users are configured, so a browser prompts for them, else Bearer).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Sequence

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from busreg.settings import GatewayAuthSettings

__all__ = ["AuthGuard", "HeaderLimit", "allowed"]

log = logging.getLogger("busreg.gateway.auth")


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def allowed(
    authorization: str | None, consul_token: str | None, token: str | None, users: dict[str, str]
) -> bool:
    """Whether the request's credentials match (pure; headers as received)."""
    if token is not None:
        if consul_token is not None and _same(consul_token, token):
            return True  # Prometheus' consul_sd_config sends its `token` this way
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and _same(value.strip(), token):
                return True
    if users and authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, password = (
                    base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                return False
            expected = users.get(user)
            # compared even for an unknown user, so timing does not tell users apart
            ok = _same(password, expected if expected is not None else "\0" + password)
            return bool(sep) and expected is not None and ok
    return False


async def json_reply(
    send: Send, status: int, body: dict[str, str], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole JSON answer from middleware (no app behind it answers)."""
    data = orjson.dumps(body)
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start + list(headers)})
    await send({"type": "http.response.body", "body": data})


class AuthGuard:
    """ASGI middleware: lets through requests with valid credentials (or all when off)."""

    def __init__(
        self, app: ASGIApp, auth: GatewayAuthSettings, exempt: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self._token = None if auth.token is None else auth.token.get_secret_value()
        self._users = auth.user_map()
        self._on = auth.enabled
        #: path prefixes with an authentication of their own (the Eureka API)
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._on or scope["type"] not in ("http", "websocket") or self._is_exempt(scope):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if allowed(
            headers.get("authorization"), headers.get("x-consul-token"), self._token, self._users
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        log.debug("refused %s %s: no valid credentials", scope.get("method"), scope.get("path"))
        challenge = (
            b'Basic realm="busreg", charset="UTF-8"' if self._users else b'Bearer realm="busreg"'
        )
        error = "authentication required: give the gateway's credentials"
        await json_reply(send, 401, {"error": error}, [(b"www-authenticate", challenge)])

    def _is_exempt(self, scope: Scope) -> bool:
        path = str(scope.get("path", ""))
        return any(path == p or path.startswith(p + "/") for p in self._exempt)


class HeaderLimit:
    """ASGI middleware: refuses (431) a request whose headers total more than ``limit``
    bytes. The server bounds what it buffers of an incomplete request (h11's
    ``max_incomplete_event_size``); this bounds what a complete one may bring in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > self.limit:
                error = f"request headers too large ({size} bytes; at most {self.limit})"
                await json_reply(send, 431, {"error": error})
                return
        await self.app(scope, receive, send)
