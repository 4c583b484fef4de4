"""A tiny HTTP server whose health the test sets: healthy, 503, hanging, or gone."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

Mode = Literal["ok", "503", "hang"]


class HealthServer:
    """``async with HealthServer() as s:`` serves ``GET /health`` on ``s.url``."""

    def __init__(self) -> None:
        self.mode: Mode = "ok"
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._gone = asyncio.Event()  # hanging requests end when the server is killed
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    async def __aenter__(self) -> HealthServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    async def kill(self) -> None:
        """Stop listening and drop every connection (the app died)."""
        self._gone.set()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # the request line and headers
            self.requests += 1
            if self.mode == "hang":
                await self._gone.wait()  # never answers while the server lives
                return
            status = "200 OK" if self.mode == "ok" else "503 Service Unavailable"
            body = b"ok" if self.mode == "ok" else b"busy"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass  # the checker gave up on us
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
