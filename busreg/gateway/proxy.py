"""Edge routing (the seed's Zuul): ``/<service>/<path>?<query>`` to a live instance.

    proxy = RouteProxy(registry, settings, route=RouteSettings(services=["inventory"]))
    await proxy.start()            # eager load of the listed services' views
    app = Starlette(routes=[Mount("/route", app=proxy)])   # busreg gateway --route

Calls go through busreg's callers stack (``BusregTransport``): live view, round robin or
zone-aware, outlier ejection, ``RetryPolicy`` with its deadline rule, one ``RetryBudget``.
Non-idempotent methods are retried only when the client sent an ``Idempotency-Key``.
Bodies stream both ways (a request body up to ``replay_buffer`` bytes is read first so a
retry can send it again); hop-by-hop headers are removed both ways; ``X-Forwarded-*`` set;
failures are JSON saying what failed (404, 503, 502 with each attempt, 504 deadline).
See docs/gateway-proxy.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
from asyncio import Event
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote

import httpx
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from busreg.callers.http_client import (
    ATTEMPT_LOG_EXTENSION,
    POLICY_EXTENSION,
    SERVICE_EXTENSION,
    AttemptRecord,
    BusregTransport,
    DeadlineExceeded,
)
from busreg.callers.retry import IDEMPOTENCY_HEADER, RetryBudget, RetryPolicy
from busreg.client.registry import Registry
from busreg.errors import BusregError, ConfigurationError, NoInstanceAvailable
from busreg.settings import RoutingSettings, Settings
from busreg.wire.models import ServiceName

__all__ = ["ProxyStats", "RouteProxy", "RouteSettings"]

log = logging.getLogger("busreg.gateway.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Connection-only headers (RFC 9110 §7.6.1), plus those named in Connection and Proxy-*.
#: ``Expect`` is answered by this server (uvicorn sends 100 Continue), not passed on.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix")
#: The serving uvicorn writes its own Date and Server: the instance's are hidden, as nginx
#: does by default, instead of sending two of each.
_RESPONSE_HIDDEN = frozenset({b"date", b"server"})
#: The URL host of routed requests: the service goes in an extension (httpx lowercases
#: hosts), and a host that cannot resolve keeps a routing mistake from leaving the machine.
_PLACEHOLDER_HOST = "busreg-service.invalid"

_service_name: TypeAdapter[str] = TypeAdapter(ServiceName)


class RouteSettings(RoutingSettings):
    """``settings.gateway.routing`` with the names and the retry policy checked."""

    services: list[ServiceName] = Field(default_factory=list)

    @model_validator(mode="after")
    def _valid_policy(self) -> RouteSettings:
        try:
            self.policy()
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def policy(self) -> RetryPolicy:
        """The RetryPolicy of routed calls (idempotent methods only)."""
        base = RetryPolicy(
            connect=self.connect_timeout,
            read=self.read_timeout,
            max_auto_retries=self.max_auto_retries,
            max_auto_retries_next_server=self.max_auto_retries_next_server,
        )
        return replace(base, deadline=self.deadline or base.worst_case())


@dataclass(slots=True)
class ProxyStats:
    """Counters of one proxy."""

    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    client_gone: int = 0
    upstream_broken: int = 0


class _ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


class UpstreamBroken(RuntimeError):
    """The instance failed after the response started: the client connection is aborted."""


class _Failure(Exception):
    """A JSON error answer: ``{"error": ..., "service": ..., **extra}``."""

    def __init__(self, status: int, error: str, service: str | None = None, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.body = {"error": error} | ({"service": service} if service else {}) | extra


class _StreamedBody(httpx.AsyncByteStream):
    """A request body read from ASGI ``receive`` while it is sent: read once, never replayed."""

    def __init__(self, head: list[bytes], receive: Receive, done: asyncio.Event) -> None:
        self._head = head
        self._receive = receive
        self._done = done
        self._started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._started:  # CallState(replayable=False) never asks for a second pass
            raise RuntimeError("a streamed request body cannot be sent twice")
        self._started = True
        for chunk in self._head:
            yield chunk
        self._head = []
        more = True
        while more:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            more = bool(message.get("more_body", False))
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
        self._done.set()


class RouteProxy:
    """ASGI app forwarding ``/<service>/<path>`` to an instance of ``<service>``; ``route``
    defaults to ``settings.gateway.routing`` (``BUSREG_GATEWAY__ROUTING__*``)."""

    def __init__(
        self, registry: Registry, settings: Settings, *, route: RouteSettings | None = None
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.route = route or _configured(settings)
        self._policy = self.route.policy()
        self._keyed = replace(self._policy, ok_to_retry_on_all_operations=True)
        self._transport: BusregTransport | None = None
        self._unknown: dict[str, float] = {}  # service -> until (monotonic) it stays a 404
        self._checking: dict[str, asyncio.Task[bool]] = {}
        self.stats = ProxyStats()

    @property
    def transport(self) -> BusregTransport:
        if self._transport is None:
            raise RuntimeError("RouteProxy.start() was not called")
        return self._transport

    async def start(self) -> None:
        """Open the connection pool and load the listed services' views (eager loading)."""
        if self._transport is not None:
            return
        r = self.route
        limits = {"max_connections", "max_keepalive_connections", "keepalive_expiry"}
        inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(**r.model_dump(include=limits)))
        ratio, floor = r.retry_budget_ratio, r.retry_budget_min_per_second
        self._transport = BusregTransport(
            self.registry, services=r.services, policy=self._policy, zone=r.zone, inner=inner,
            budget=RetryBudget(ratio=ratio, min_per_second=floor),
        )  # fmt: skip
        await self._transport.warm_up()
        log.info("route proxy started; services loaded at start: %s", r.services or "none")

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        for task in self._checking.values():
            task.cancel()
        if transport is not None:
            await transport.aclose()

    # --- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # not proxied: refuse the handshake
            await send({"type": "websocket.close", "code": 1003, "reason": "not proxied"})
        if scope["type"] != "http":
            return
        self.stats.requests += 1
        body_done = asyncio.Event()
        finished = False

        async def watch_disconnect() -> None:
            # a client that leaves cancels the call and the instance's response with it
            await body_done.wait()
            message = await receive()
            if message["type"] == "http.disconnect" and not finished:
                raise _ClientGone

        async def answer(start: Message) -> None:
            nonlocal finished
            if not start.get("more_body", True):
                finished = True
            await send(start)

        try:
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(watch_disconnect())
                try:
                    await self._handle(scope, receive, answer, body_done)
                finally:
                    watcher.cancel()
        except* _ClientGone:
            self.stats.client_gone += 1
            log.debug("client left %s %s", scope.get("method"), scope.get("path"))

    async def _handle(self, scope: Scope, receive: Receive, send: Send, done: Event) -> None:
        try:
            if self._transport is None:
                raise _Failure(503, "the route proxy is not started")
            service, target, prefix = self._target(scope)
            await self._ensure_loaded(service)
            request = await self._request(scope, receive, service, target, prefix, done)
            await self._forward(send, service, request)
        except _Failure as failure:
            done.set()
            await self._error(send, failure.status, failure.body)

    # --- routing ----------------------------------------------------------------------------

    def _target(self, scope: Scope) -> tuple[str, bytes, str]:
        """(service, path and query for the instance, X-Forwarded-Prefix)."""
        root = str(scope.get("root_path", ""))
        raw = _raw_route_path(scope)
        query = scope.get("query_string", b"")
        suffix = b"?" + query if query else b""
        if self.route.host_routing:
            host = next((v for k, v in scope["headers"] if k.lower() == b"host"), b"")
            service = self._host_service(bytes(host).decode("latin-1"))
            if service is not None:
                return service, (raw or b"/") + suffix, root
        first, _, rest = raw.lstrip(b"/").partition(b"/")
        if not first:
            raise _Failure(404, "no route: the path must be /<service>/<path>")
        service = unquote(first.decode("latin-1"))
        try:
            _service_name.validate_python(service)
        except ValidationError:
            raise _Failure(404, f"no route: invalid service name {service!r}", service) from None
        return service, b"/" + rest + suffix, f"{root}/{service}"

    def _host_service(self, host: str) -> str | None:
        name = host if host.endswith("]") else host.rsplit(":", 1)[0]
        suffix = self.route.host_suffix
        if suffix:  # any service: <service><suffix>
            cut = name[: -len(suffix)] if name.lower().endswith(suffix.lower()) else ""
            return cut or None
        return next((s for s in self.transport.services if s.lower() == name.lower()), None)

    async def _ensure_loaded(self, service: str) -> None:
        """The service's view is held by the transport; 404 when it never existed."""
        transport = self.transport
        if service in transport.services:
            return
        if self.route.only_listed:
            raise _Failure(404, f"no route to service {service!r}", service)
        loop = asyncio.get_running_loop()
        if self._unknown.get(service, 0.0) > loop.time():
            raise _Failure(404, f"unknown service: {service}", service)
        task = self._checking.get(service)
        if task is None:
            if len(transport.services) >= self.route.max_services:
                limit = self.route.max_services
                raise _Failure(503, f"too many routed services (max_services={limit})", service)
            task = asyncio.create_task(self._load(service), name=f"route-load-{service}")
            self._checking[service] = task
            task.add_done_callback(lambda _: self._checking.pop(service, None))
        try:
            # shielded: a client that leaves does not cancel the load the others wait for
            exists = await asyncio.shield(task)
        except BusregError as exc:
            raise _Failure(503, "registry unavailable", service, detail=str(exc)) from None
        if not exists:
            raise _Failure(404, f"unknown service: {service}", service)

    async def _load(self, service: str) -> bool:
        # a snapshot first: a name nobody registered (revision 0) gets a 404 and no view, so
        # requests for made-up names cannot make the gateway hold thousands of views
        snapshot = await self.registry.snapshot(service)
        if snapshot.revision == 0:
            if len(self._unknown) > 4096:
                self._unknown.clear()
            ttl = self.route.unknown_service_ttl
            self._unknown[service] = asyncio.get_running_loop().time() + ttl
            return False
        await self.transport.warm_up(service)
        log.info("service %r loaded on its first request", service)
        return True

    # --- the request ------------------------------------------------------------------------

    async def _request(
        self,
        scope: Scope,
        receive: Receive,
        service: str,
        target: bytes,
        prefix: str,
        done: asyncio.Event,
    ) -> httpx.Request:
        raw: list[tuple[bytes, bytes]] = [(k.lower(), v) for k, v in scope.get("headers", [])]
        framed = any(k in (b"content-length", b"transfer-encoding") for k, _ in raw)
        length = next((v for k, v in raw if k == b"content-length"), None)
        headers = _strip(raw, (b"host", b"expect", b"content-length"))
        if not self.route.trust_forwarded:
            headers = [(k, v) for k, v in headers if k not in _FORWARDED]
        headers.extend(self._forwarded(scope, raw, prefix))
        headers.insert(0, (b"host", service.encode()))
        method = str(scope["method"])
        policy = self._policy
        keyed = any(k == IDEMPOTENCY_HEADER.lower().encode() for k, _ in headers)
        if keyed and self.route.retry_with_idempotency_key and not policy.is_idempotent(method):
            policy = self._keyed  # the client's key goes with every attempt

        # read up to replay_buffer bytes: a body that fits can be sent again on a retry
        head: list[bytes] = []
        size, more = 0, True
        while more and size < self.route.replay_buffer:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            if chunk:
                head.append(chunk)
                size += len(chunk)
        body: httpx.AsyncByteStream
        if not more:
            done.set()
            body = httpx.ByteStream(b"".join(head))
            if framed or size:
                headers.append((b"content-length", b"%d" % size))
        else:
            body = _StreamedBody(head, receive, done)
            headers.append(
                (b"content-length", length) if length else (b"transfer-encoding", b"chunked")
            )
        return httpx.Request(
            method,
            httpx.URL(scheme="http", host=_PLACEHOLDER_HOST, raw_path=target),
            headers=headers,
            stream=body,
            extensions={SERVICE_EXTENSION: service, POLICY_EXTENSION: policy},
        )

    def _forwarded(
        self, scope: Scope, raw: list[tuple[bytes, bytes]], prefix: str
    ) -> list[tuple[bytes, bytes]]:
        given = {k: v for k, v in raw if k in _FORWARDED} if self.route.trust_forwarded else {}
        client = scope.get("client")
        address = str(client[0]).encode() if client else b"unknown"
        chain = given.get(b"x-forwarded-for")
        scheme = str(scope.get("scheme", "http")).encode()
        out = [
            (b"x-forwarded-for", chain + b", " + address if chain else address),
            (b"x-forwarded-proto", given.get(b"x-forwarded-proto", scheme)),
            (b"x-forwarded-host", given.get(b"x-forwarded-host", dict(raw).get(b"host", b""))),
            (b"x-forwarded-prefix", given.get(b"x-forwarded-prefix", b"") + prefix.encode()),
        ]
        return [(k, v) for k, v in out if v]

    async def _forward(self, send: Send, service: str, request: httpx.Request) -> None:
        attempts: list[AttemptRecord] = []
        request.extensions[ATTEMPT_LOG_EXTENSION] = attempts
        try:
            response = await self.transport.handle_async_request(request)
        except DeadlineExceeded:
            deadline = request.extensions[POLICY_EXTENSION].deadline
            tried = _attempts(attempts)
            raise _Failure(
                504, "deadline exceeded", service, deadline=deadline, attempts=tried
            ) from None
        except NoInstanceAvailable as exc:
            if attempts:  # instances were tried, then none was left for a retry
                raise _all_failed(service, attempts, exc) from None
            raise _Failure(503, "no instance available", service, detail=str(exc)) from None
        except httpx.PoolTimeout as exc:
            raise _Failure(503, "connection pool exhausted", service, detail=str(exc)) from None
        except httpx.TransportError as exc:
            raise _all_failed(service, attempts, exc) from None
        except BusregError as exc:  # the view could not be loaded
            raise _Failure(503, "registry unavailable", service, detail=str(exc)) from None
        try:
            await self._relay(send, response)
        finally:
            await response.aclose()

    async def _relay(self, send: Send, response: httpx.Response) -> None:
        status = response.status_code
        headers = _strip([(k.lower(), v) for k, v in response.headers.raw], _RESPONSE_HIDDEN)
        self._count(status)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        try:
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TransportError as exc:
            # the status is already sent: the only honest signal left is an aborted response
            self.stats.upstream_broken += 1
            instance = response.extensions.get("busreg.instance")
            log.warning("instance %s failed while sending its response: %r", instance, exc)
            raise UpstreamBroken(f"instance {instance} failed mid-response: {exc!r}") from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _count(self, status: int) -> None:
        self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1

    async def _error(self, send: Send, status: int, body: dict[str, Any]) -> None:
        self._count(status)
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})


def _configured(settings: Settings) -> RouteSettings:
    """``settings.gateway.routing``, checked."""
    return RouteSettings.model_validate(settings.gateway.routing.model_dump())


def _strip(headers: list[tuple[bytes, bytes]], extra: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """``headers`` (lower-case names) without the hop-by-hop ones and ``extra``."""
    named = [t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")]
    drop = HOP_BY_HOP | set(named) | set(extra)
    return [(k, v) for k, v in headers if k not in drop and not k.startswith(b"proxy-")]


def _raw_route_path(scope: Scope) -> bytes:
    """The path below the mount point as the client encoded it: the shortest raw suffix that
    decodes to ``path`` minus ``root_path`` (raw_path may lack the server's root path)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    route = path[len(root) :] if root and path.startswith(root) else path
    raw = scope.get("raw_path")
    if raw:
        parts = bytes(raw).split(b"/")
        for k in range(len(parts) - 1, 0, -1):
            candidate = b"/" + b"/".join(parts[k:])
            if unquote(candidate.decode("latin-1")) == route:
                return candidate
        if not route:
            return b""
    return httpx.URL(route).raw_path if route else b""


def _attempts(attempts: list[AttemptRecord]) -> list[dict[str, str]]:
    return [{"instance": a.instance_id, "address": a.address, "error": a.error} for a in attempts]


def _all_failed(service: str, attempts: list[AttemptRecord], exc: BaseException) -> _Failure:
    notes = [n.removeprefix("busreg: ") for n in getattr(exc, "__notes__", [])]
    detail = {"detail": "; ".join(notes)} if notes else {}
    return _Failure(502, "all attempts failed", service, attempts=_attempts(attempts), **detail)
