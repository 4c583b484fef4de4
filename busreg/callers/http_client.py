"""httpx integration: call services by name through busreg (Ribbon + Feign, for httpx).

    from busreg.callers.http_client import async_client
    from busreg.callers.retry import RetryPolicy

    async with Registry(settings) as registry:
        policy = RetryPolicy(connect=0.5, read=2.0, max_auto_retries_next_server=1)
        async with await async_client(registry, services=["inventory"], policy=policy) as http:
            response = await http.get("http://inventory/items/1")

The host of a URL is a service name. ``BusregTransport`` resolves it through the service's
live view (loaded eagerly by ``warm_up``, so the first call does not wait for a snapshot),
chooses an instance with a load balancer (round robin, or zone-aware when a ``zone`` is
given), and sends the request there through an inner ``httpx.AsyncHTTPTransport`` with the
policy's connect/read timeouts for each attempt. Failures are handled as ``busreg.callers.retry``
describes: a connect failure ejects the instance from this client's choices at once and
the call goes on to the next server (a connection broken under a request makes the
instance "suspect": one attempt at a time until it answers or a connect fails); read
failures and 502/503/504 are retried only for idempotent methods unless
``ok_to_retry_on_all_operations``, and then with one ``Idempotency-Key`` for every attempt
of the call; every retry needs a token from the shared ``RetryBudget``; an outer
``deadline`` bounds the whole call.

The request keeps its ``Host`` header (the service name). Hosts that are not listed in
``services`` pass through unchanged to the inner transport, unless ``lazy=True``, which
resolves any host as a service and loads its view on first use. A response carries the
chosen instance in ``response.extensions["busreg.instance"]`` and the number of attempts
in ``response.extensions["busreg.attempts"]``.

Two request extensions serve callers that are proxies (``busreg.gateway.proxy``):
``SERVICE_EXTENSION`` names the service when the URL host cannot (httpx lowercases hosts;
service names may have capitals), and a list under ``ATTEMPT_LOG_EXTENSION`` receives an
``AttemptRecord`` for every attempt that failed, so the caller can say what failed where.

httpx is an optional dependency (``pip install busreg[http]``); only this module imports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from busreg.callers.balancer import InstanceSource, LoadBalancer, RoundRobin, ZoneAware
from busreg.callers.retry import (
    IDEMPOTENCY_HEADER,
    CallState,
    Decision,
    Failure,
    RetryBudget,
    RetryPolicy,
)
from busreg.wire.models import Instance

__all__ = [
    "ATTEMPT_LOG_EXTENSION",
    "SERVICE_EXTENSION",
    "AttemptRecord",
    "BalancerFactory",
    "BusregTransport",
    "DeadlineExceeded",
    "TransportStats",
    "ViewProvider",
    "async_client",
]

log = logging.getLogger("busreg.http")

#: Errors of an attempt that never reached the server (safe to send elsewhere).
_CONNECT_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)
#: Errors after the request may have been (partly) sent: the server may have acted on it.
_READ_ERRORS: tuple[type[Exception], ...] = (
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)

#: A connection that broke under a request (reset, closed without an answer): the process
#: may have died. The instance is then probed one attempt at a time (``suspect``).
_BROKEN_CONNECTION: tuple[type[Exception], ...] = (
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)

#: Per-request policy override: ``client.get(url, extensions={POLICY_EXTENSION: policy})``.
POLICY_EXTENSION = "busreg.policy"
#: The service to call when it is not the URL host: ``extensions={SERVICE_EXTENSION: "Inv"}``.
SERVICE_EXTENSION = "busreg.service"
#: A ``list[AttemptRecord]`` the transport appends every failed attempt of the call to.
ATTEMPT_LOG_EXTENSION = "busreg.attempt_log"


class ViewProvider(Protocol):
    """What the transport needs from a ``Registry``: live views by service name."""

    async def watch(self, service: str) -> InstanceSource: ...


#: Builds the balancer of one service from its live view.
BalancerFactory = Callable[[InstanceSource], LoadBalancer]


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One failed attempt of a call: where it went and why it failed."""

    instance_id: str
    address: str
    error: str


class DeadlineExceeded(httpx.TimeoutException):
    """The policy's outer deadline passed before any attempt succeeded."""


@dataclass(slots=True)
class TransportStats:
    """Counters of one transport (all calls through it)."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    budget_denied: int = 0
    connect_failures: int = 0
    read_failures: int = 0
    status_retries: int = 0
    ejections: int = 0
    failed_calls: int = 0


class _TrackedStream(httpx.AsyncByteStream):
    """A response body that tells the balancer when the attempt is over."""

    def __init__(self, stream: httpx.AsyncByteStream, on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._on_close: Callable[[], None] | None = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._on_close is not None:
                self._on_close()
                self._on_close = None


class BusregTransport(httpx.AsyncBaseTransport):
    """An httpx transport resolving ``http://<service>/...`` through busreg.

    transport = BusregTransport(registry, services=["inventory"], policy=RetryPolicy())
    await transport.warm_up()
    client = httpx.AsyncClient(transport=transport)
    """

    def __init__(
        self,
        registry: ViewProvider,
        *,
        services: Iterable[str] = (),
        policy: RetryPolicy | None = None,
        budget: RetryBudget | None = None,
        zone: str | None = None,
        balancer: BalancerFactory | None = None,
        inner: httpx.AsyncBaseTransport | None = None,
        lazy: bool = False,
    ) -> None:
        self.registry = registry
        self.services = list(dict.fromkeys(services))
        self.policy = policy or RetryPolicy()
        self.budget = budget or RetryBudget()
        self.zone = zone
        self._factory = balancer
        self._inner = inner or httpx.AsyncHTTPTransport()
        self.lazy = lazy
        self.stats = TransportStats()
        self._balancers: dict[str, LoadBalancer] = {}
        self._loading: dict[str, asyncio.Future[LoadBalancer]] = {}

    # --- views and balancers -------------------------------------------------------------------

    async def warm_up(self, *services: str) -> None:
        """Load the views of ``services`` (default: the configured ones) now, so the first
        call to each does not wait for a snapshot (Ribbon's eager load)."""
        names = list(services) or self.services
        for name in names:
            if name not in self.services:
                self.services.append(name)
        await asyncio.gather(*(self.balancer(name) for name in names))

    async def balancer(self, service: str) -> LoadBalancer:
        """The balancer of ``service`` (its view is loaded on first use)."""
        found = self._balancers.get(service)
        if found is not None:
            return found
        pending = self._loading.get(service)
        if pending is None:  # one snapshot load per service, however many calls wait for it
            pending = asyncio.get_running_loop().create_future()
            self._loading[service] = pending
            try:
                view = await self.registry.watch(service)
                made = self._make_balancer(view)
            except BaseException as exc:
                del self._loading[service]
                pending.set_exception(exc)
                pending.exception()  # retrieved: the waiters (if any) re-raise it
                raise
            self._balancers[service] = made
            del self._loading[service]
            pending.set_result(made)
            return made
        return await asyncio.shield(pending)

    def _make_balancer(self, view: InstanceSource) -> LoadBalancer:
        if self._factory is not None:
            return self._factory(view)
        if self.zone is not None:
            return ZoneAware(view, zone=self.zone)
        return RoundRobin(view)

    def _resolves(self, host: str) -> bool:
        return self.lazy or host in self.services

    # --- requests ------------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service = request.extensions.get(SERVICE_EXTENSION) or request.url.host
        if not self._resolves(service):
            return await self._inner.handle_async_request(request)
        policy = request.extensions.get(POLICY_EXTENSION, self.policy)
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"extensions[{POLICY_EXTENSION!r}] must be a RetryPolicy")
        balancer = await self.balancer(service)
        if self.lazy and service not in self.services:
            log.info("service %r loaded on first call; list it in services= to warm it up", service)
            self.services.append(service)
        self.stats.calls += 1
        self.budget.deposit()
        try:
            if policy.deadline is None:
                return await self._call(request, service, balancer, policy)
            try:
                async with asyncio.timeout(policy.deadline):
                    return await self._call(request, service, balancer, policy)
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"{request.method} {request.url}: no success within the policy's "
                    f"deadline of {policy.deadline:g}s",
                    request=request,
                ) from exc
        except BaseException:
            self.stats.failed_calls += 1
            raise

    async def _call(
        self,
        request: httpx.Request,
        service: str,
        balancer: LoadBalancer,
        policy: RetryPolicy,
    ) -> httpx.Response:
        state = CallState(
            policy,
            request.method,
            dict(request.headers),
            replayable=isinstance(request.stream, httpx.ByteStream),
        )
        if state.idempotency_key is not None and IDEMPOTENCY_HEADER not in request.headers:
            request.headers[IDEMPOTENCY_HEADER] = state.idempotency_key
        tried: list[str] = []
        log_to = request.extensions.get(ATTEMPT_LOG_EXTENSION)
        instance = balancer.choose(exclude=tried)
        while True:
            self.stats.attempts += 1
            failure: Failure
            error: Exception | None = None
            response: httpx.Response | None = None
            balancer.started(instance)
            try:
                response = await self._inner.handle_async_request(
                    self._attempt(request, instance, policy)
                )
            except _CONNECT_ERRORS as exc:
                balancer.finished(instance)
                self.stats.connect_failures += 1
                self.stats.ejections += 1
                until = balancer.eject(instance)
                log.info(
                    "%s/%s (%s) unreachable: %r; ejected for %.1fs",
                    service,
                    instance.instance_id,
                    instance.address,
                    exc,
                    until - balancer.clock(),
                )
                failure, error = Failure.CONNECT, exc
            except _READ_ERRORS as exc:
                balancer.finished(instance)
                self.stats.read_failures += 1
                if isinstance(exc, _BROKEN_CONNECTION):  # not a timeout: the peer went away
                    balancer.suspect(instance)
                failure, error = Failure.READ, exc
            except BaseException:
                balancer.finished(instance)
                raise
            else:
                balancer.record_success(instance)  # it answered: reachable, whatever the status
                if not state.retryable_status(response.status_code):
                    return self._finish(response, balancer, instance, state)
                failure = Failure.STATUS
            if isinstance(log_to, list):
                what = f"status {response.status_code}" if response is not None else ""
                log_to.append(
                    AttemptRecord(
                        instance.instance_id,
                        instance.address,
                        _describe(error) if error is not None else what,
                    )
                )

            decision = state.decide(failure)
            if decision is not Decision.GIVE_UP and not self.budget.try_withdraw():
                self.stats.budget_denied += 1
                decision = Decision.GIVE_UP
                note = "busreg: retry budget exhausted; not retried"
            elif failure is not Failure.CONNECT and not policy.may_retry(request.method):
                note = (
                    f"busreg: {request.method} not retried: the server may have applied it "
                    "(RetryPolicy.ok_to_retry_on_all_operations allows it, with an Idempotency-Key)"
                )
            else:
                note = f"busreg: gave up after {state.attempts} attempt(s) on {service}"
            if decision is Decision.GIVE_UP:
                if response is not None:  # the retryable status is the answer
                    return self._finish(response, balancer, instance, state)
                assert error is not None
                error.add_note(note)
                raise error
            if response is not None:
                self.stats.status_retries += 1
                await response.aclose()
                balancer.finished(instance)
            self.stats.retries += 1
            state.advance(decision)
            tried.append(instance.instance_id)
            if decision is Decision.NEXT_SERVER:
                instance = balancer.choose(exclude=tried)

    @staticmethod
    def _attempt(request: httpx.Request, instance: Instance, policy: RetryPolicy) -> httpx.Request:
        extensions: dict[str, Any] = dict(request.extensions)
        extensions["timeout"] = {
            "connect": policy.connect,
            "read": policy.read,
            "write": policy.read,
            "pool": policy.connect,
        }
        return httpx.Request(
            request.method,
            request.url.copy_with(host=instance.host, port=instance.port),
            headers=request.headers,  # Host stays the service name
            stream=request.stream,
            extensions=extensions,
        )

    def _finish(
        self,
        response: httpx.Response,
        balancer: LoadBalancer,
        instance: Instance,
        state: CallState,
    ) -> httpx.Response:
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        extensions = dict(response.extensions)
        extensions["busreg.instance"] = instance.instance_id
        extensions["busreg.address"] = instance.address
        extensions["busreg.attempts"] = state.attempts
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_TrackedStream(stream, lambda: balancer.finished(instance)),
            extensions=extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


def _describe(exc: Exception) -> str:
    """``ConnectError: [Errno 111] Connection refused`` (the type says which phase failed)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def async_client(
    registry: ViewProvider,
    *,
    services: Iterable[str] = (),
    policy: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    zone: str | None = None,
    balancer: BalancerFactory | None = None,
    inner: httpx.AsyncBaseTransport | None = None,
    lazy: bool = False,
    **client_options: Any,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` calling services through busreg, views already loaded.

    async with await async_client(registry, services=["inventory"]) as http:
        await http.get("http://inventory/items/1")
    """
    transport = BusregTransport(
        registry,
        services=services,
        policy=policy,
        budget=budget,
        zone=zone,
        balancer=balancer,
        inner=inner,
        lazy=lazy,
    )
    await transport.warm_up()
    return httpx.AsyncClient(transport=transport, **client_options)
