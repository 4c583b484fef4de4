"""Running the gateway with uvicorn (``busreg gateway``).

Limits a hostile or careless client meets (docs/gateway.md, "Limits"):
* ``gateway.max_connections``: uvicorn's ``limit_concurrency``; past it, 503;
* ``gateway.max_header_bytes``: h11's ``max_incomplete_event_size``; a longer request line
  and headers are refused (400) before the app sees them;
* ``gateway.max_streams`` and ``gateway.stream_buffer``: SSE streams (busreg.gateway.sse).

SIGTERM/SIGINT: the open event streams are ended first (they would otherwise hold the
graceful shutdown until its timeout), then uvicorn stops serving (``should_exit``), then
the lifespan closes the catalog and the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from busreg.errors import BusregError
from busreg.gateway import create_app
from busreg.gateway.catalog import Catalog
from busreg.settings import Settings

__all__ = ["serve"]

log = logging.getLogger("busreg.gateway.server")

#: Seconds connections get to finish after SIGTERM before they are closed.
GRACEFUL_SHUTDOWN = 5


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling: SIGTERM/SIGINT end the event streams and
    stop serving, and the process then exits normally (status 0). uvicorn's own handling
    re-raises the signal after its shutdown, so a graceful stop looked like a kill."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _stop(self, sig: int) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: do not wait for connections
            return
        log.info("gateway stopping (%s)", signal.Signals(sig).name)
        catalog = getattr(getattr(self.config.app, "state", None), "catalog", None)
        if isinstance(catalog, Catalog):
            catalog.close_streams()
        self.should_exit = True


async def serve(settings: Settings, *, operator: bool | None = None) -> None:
    """Serve the gateway on ``settings.gateway.host:port`` until SIGTERM or SIGINT."""
    gateway = settings.gateway
    app = create_app(settings, operator=operator)
    config = uvicorn.Config(
        app,
        host=gateway.host,
        port=gateway.port,
        log_config=None,  # the CLI configured logging; uvicorn's loggers propagate to it
        access_log=False,
        lifespan="on",
        limit_concurrency=gateway.max_connections,
        h11_max_incomplete_event_size=gateway.max_header_bytes,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        server_header=False,
        # h11, not httptools: its incomplete-event bound is what stops a client that sends
        # headers for ever (max_header_bytes); the 431 middleware covers complete ones
        http="h11",
        # the client address is the peer's: X-Forwarded-For from a local client would
        # otherwise be believed (forwarded_allow_ips defaults to 127.0.0.1)
        proxy_headers=False,
    )
    server = _Server(config)
    await server.serve()
    if not server.started:
        # uvicorn logs why (port in use, lifespan failure) and returns instead of raising
        raise BusregError(
            f"the gateway did not start on {gateway.host}:{gateway.port} (see the log above)"
        )
