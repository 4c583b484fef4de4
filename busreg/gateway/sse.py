"""Server-Sent Events: a service's changes, and everything for the dashboard.

``GET /api/v1/services/{service}/events``: ``event: snapshot`` (the service JSON, ``id:``
its revision), then ``event: delta`` per change (``id:`` the revision). A client that
reconnects with ``Last-Event-ID: <revision>`` gets only the deltas after it when the
gateway still holds them all in the same epoch, else a fresh snapshot.

``GET /api/v1/events``: ``event: state`` (every service and the recent changes), then
``event: change`` (``id:`` the gateway-wide seq) and ``event: operator`` samples.

Each stream has a bounded queue (``gateway.stream_buffer``): a client that falls that far
behind is disconnected, never waited for. ``: ping`` comments every 15 s keep proxies from
closing an idle stream and find dead clients. At most ``gateway.max_streams`` are open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from busreg.gateway.api import ApiError, NoQuery, catalog_of, query, service_name
from busreg.gateway.catalog import Catalog, Event, StreamsFull, Subscriber

__all__ = ["EventStream", "dashboard_events", "frame", "service_events"]

log = logging.getLogger("busreg.gateway.sse")

#: Seconds between keep-alive comments on an idle stream.
PING_INTERVAL = 15.0
#: What EventSource waits before reconnecting (ms), sent once per stream.
RETRY_MS = 1000
#: How long a dashboard stream opened while the gateway starts waits for the first listing
#: before it is refused with 503 (the page retries).
LOADING_WAIT = 10.0


def frame(event: str, data: bytes, event_id: int | None = None) -> bytes:
    """One SSE message (``data`` is one line of JSON: orjson never emits newlines)."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return head.encode() + b"data: " + data + b"\n\n"


class _Disconnected(Exception):
    pass


class EventStream(Response):
    """A text/event-stream response fed by a catalog subscription; ends on disconnect, on
    the subscriber being dropped or closed, and always unsubscribes."""

    media_type = "text/event-stream"

    def __init__(
        self,
        catalog: Catalog,
        sub: Subscriber,
        first: list[bytes],
        render: Callable[[Event], bytes | None],
    ) -> None:
        super().__init__(
            None,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type=self.media_type,
        )
        # a stream has no length: drop the content-length Response computed for no body
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._catalog = catalog
        self._sub = sub
        self._first = first
        self._render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            try:
                async with asyncio.TaskGroup() as tg:
                    watcher = tg.create_task(_until_disconnect(receive))
                    await self._pump(send)
                    watcher.cancel()
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except* (_Disconnected, OSError):
                pass  # the client left: nothing to answer
        finally:
            self._catalog.unsubscribe(self._sub)

    async def _pump(self, send: Send) -> None:
        body = f"retry: {RETRY_MS}\n\n".encode() + b"".join(self._first)
        await send({"type": "http.response.body", "body": body, "more_body": True})
        while True:
            try:
                event = await self._sub.get(PING_INTERVAL)
            except TimeoutError:
                await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
                continue
            if event is None:
                return
            chunk = self._render(event)
            if chunk is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected


def _subscribe(catalog: Catalog, service: str | None, request: Request) -> Subscriber:
    peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
    try:
        return catalog.subscribe(service, peer)
    except StreamsFull as exc:
        raise ApiError(503, f"{exc}; try again later", limit="gateway.max_streams") from None


def _last_event_id(request: Request) -> int | None:
    raw = request.headers.get("last-event-id")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"Last-Event-ID must be a revision (an integer), got {raw!r}") from None
    if value < 0:
        raise ApiError(400, "Last-Event-ID must not be negative")
    return value


async def service_events(request: Request) -> Response:
    """SSE of one service: a snapshot, then its deltas; resumable by Last-Event-ID."""
    query(request, NoQuery)
    name = service_name(request)
    last = _last_event_id(request)
    catalog = catalog_of(request)
    entry = catalog.entries.get(name)
    if entry is None:
        raise ApiError(404, f"no such service: {name}", service=name, revision=0)
    sub = _subscribe(catalog, name, request)
    # no await from the subscription to here: the snapshot and the queue agree
    resumed = catalog.resume(name, last) if last is not None else None
    if resumed is None:
        first = [frame("snapshot", orjson.dumps(entry.detail()), entry.revision)]
    else:
        first = [frame("delta", orjson.dumps(c), c["revision"]) for c in resumed]

    def render(event: Event) -> bytes | None:
        return frame("delta", event.data, event.revision) if event.kind == "change" else None

    return EventStream(catalog, sub, first, render)


async def dashboard_events(request: Request) -> Response:
    """SSE for the dashboard: the whole state, then every change and operator sample."""
    query(request, NoQuery)
    catalog = catalog_of(request)
    # The first state must hold the first listing: services it finds are not announced as
    # changes afterwards (they are what a first state shows), so a page that connected
    # during the listing would miss them until it reloaded. Wait for it, then say 503.
    try:
        async with asyncio.timeout(LOADING_WAIT):
            await catalog.loaded.wait()
    except TimeoutError:
        raise ApiError(503, "the gateway is still loading the catalog; retry") from None
    sub = _subscribe(catalog, None, request)
    state = catalog.state()
    first = [frame("state", orjson.dumps(state), catalog.seq)]
    operator = getattr(request.app.state, "operator", None)
    if operator is not None and operator.latest is not None:
        first.append(frame("operator", orjson.dumps(operator.latest)))

    def render(event: Event) -> bytes | None:
        if event.kind == "change":
            return frame("change", event.data, event.seq)
        return frame(event.kind, event.data)

    return EventStream(catalog, sub, first, render)
