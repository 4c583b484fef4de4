"""``busreg gateway``: dashboard, HTTP API, Prometheus and Consul discovery, edge routing.

    from busreg.gateway import create_app
    app = create_app(Settings())          # a Starlette app: run it with uvicorn, or mount it

The app's lifespan opens one ``Registry`` and the live ``Catalog`` (app.state.registry,
app.state.catalog). Mounted inside another Starlette app, run its lifespan from the outer
one (see docs/gateway.md, "Mounting"): Starlette does not run a mounted app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from busreg.backoff import Backoff
from busreg.client.registry import Registry
from busreg.gateway import api, consul, promsd, sse
from busreg.gateway.api import ApiError, error_response
from busreg.gateway.auth import AuthGuard, HeaderLimit
from busreg.gateway.catalog import Catalog
from busreg.gateway.operator import OperatorSampler, operator_endpoint
from busreg.settings import Settings
from busreg.tasks import cancel_until_done

__all__ = ["Catalog", "create_app"]

log = logging.getLogger("busreg.gateway")

STATIC = Path(__file__).parent / "static"
#: Pauses before restarting a background task that failed unexpectedly (a bug).
RESTART_BACKOFF = Backoff(first=0.5, cap=10.0)


async def _supervised(what: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run ``run`` until cancelled; an unexpected error is logged and ``run`` restarted
    (the catalog or the sampler must not take the gateway down with a bug)."""
    attempt = 0
    while True:
        try:
            await run()
            return
        except Exception:
            log.exception("%s failed unexpectedly; restarting it", what)
        attempt += 1
        await asyncio.sleep(RESTART_BACKOFF.delay(attempt - 1))  # back-off, not sync


class _Deferred:
    """The /route mount: forwards to the proxy once the lifespan started it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxy = getattr(scope["app"].state, "proxy", None) if "app" in scope else None
        if proxy is None:
            response = error_response(
                503, "edge routing is not running (start the gateway with --route)"
            )
            await response(scope, receive, send)
            return
        await proxy(scope, receive, send)


async def _openapi(request: Request) -> Response:
    # imported here: `python -m busreg.gateway.openapi` must find it not yet imported
    from busreg.gateway.openapi import openapi_endpoint

    return await openapi_endpoint(request)


async def _index(request: Request) -> Response:
    page = STATIC / "index.html"
    if not page.is_file():
        raise ApiError(404, "the dashboard is not installed (busreg/gateway/static)")
    return FileResponse(page, headers={"cache-control": "no-cache"})


def routes(route: bool) -> list[BaseRoute]:
    get = ["GET"]
    out: list[BaseRoute] = [
        Route("/", _index, methods=get, include_in_schema=False),
        Route("/healthz", api.healthz, methods=get),
        Route("/openapi.json", _openapi, methods=get, include_in_schema=False),
        Route("/api/v1/services", api.list_services, methods=get),
        Route("/api/v1/services/{service}", api.get_service, methods=get),
        Route("/api/v1/services/{service}/events", sse.service_events, methods=get),
        Route("/api/v1/changes", api.changes, methods=get),
        Route("/api/v1/events", sse.dashboard_events, methods=get),
        Route("/api/v1/operator", operator_endpoint, methods=get),
        Route("/prometheus/sd", promsd.http_sd, methods=get),
        *consul.routes(),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]
    if route:
        out.append(Mount("/route", app=_Deferred()))
    return out


def create_app(settings: Settings | None = None, *, operator: bool | None = None) -> Starlette:
    """The gateway as an ASGI app. ``operator`` overrides ``settings.gateway.operator``."""
    settings = settings or Settings()
    gateway = settings.gateway
    with_operator = gateway.operator if operator is None else operator

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Registry(settings, name="busreg-gateway") as registry:
            catalog = Catalog(registry, gateway)
            app.state.registry = registry
            app.state.catalog = catalog
            tasks = [asyncio.create_task(_supervised("catalog", catalog.run), name="gw-catalog")]
            proxy: Any = None
            try:
                if with_operator:
                    sampler = OperatorSampler(settings, catalog)
                    app.state.operator = sampler
                    tasks.append(asyncio.create_task(_supervised("operator sampler", sampler.run)))
                if gateway.route:
                    from busreg.gateway.proxy import RouteProxy

                    proxy = RouteProxy(registry, settings)
                    await proxy.start()
                    app.state.proxy = proxy
                log.info(
                    "gateway up: namespace=%s operator=%s route=%s auth=%s",
                    settings.namespace,
                    "on" if with_operator else "off",
                    "on" if gateway.route else "off",
                    "on" if gateway.auth.enabled else "off",
                )
                yield
            finally:
                catalog.close_streams()
                app.state.proxy = None
                if proxy is not None:
                    await proxy.close()
                await cancel_until_done(tasks)

    table = routes(gateway.route)
    exempt: tuple[str, ...] = ()
    if gateway.eureka.enabled:
        from busreg.gateway.eureka import eureka_mount

        # Eureka clients authenticate as Eureka users (gateway.eureka.users), not with the
        # gateway's own credentials: the guard leaves that path to the Eureka API
        table.insert(0, eureka_mount(settings, gateway.eureka))
        exempt = (gateway.eureka.path,)
    app = Starlette(
        routes=table,
        middleware=[
            Middleware(HeaderLimit, limit=gateway.max_header_bytes),
            Middleware(AuthGuard, auth=gateway.auth, exempt=exempt),
        ],
        exception_handlers={ApiError: api.api_error, HTTPException: api.http_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.operator = None
    app.state.proxy = None
    return app
