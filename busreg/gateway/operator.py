"""Operator pages: workers, partitions and dead letters, sampled from Redis and the broker.

Only when enabled (``gateway.operator`` or ``busreg gateway --redis-url ...``): the rest of
the gateway needs AMQP only. A background task samples what ``busreg status`` and
``busreg deadletters`` read (busreg.ops.status, busreg.ops.deadletters) every
``gateway.operator_interval`` seconds, keeps ten minutes of history, and pushes each sample
to the dashboards' event streams. Requests read the latest sample; none touches Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from busreg.backoff import RetryLog
from busreg.errors import BusregError
from busreg.gateway.api import NoQuery, error_response, query
from busreg.gateway.catalog import Catalog, Event
from busreg.ops.deadletters import read_dead_letters
from busreg.ops.status import collect_status
from busreg.settings import Settings

__all__ = ["HISTORY_SECONDS", "OperatorSampler", "operator_endpoint", "operator_view"]

log = logging.getLogger("busreg.gateway.operator")

#: The history plots cover this many seconds.
HISTORY_SECONDS = 600.0
#: Dead letters read per sample to count them by reason (reading is non-destructive).
DEADLETTER_READ = 500


def operator_view(report: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(workers, partitions) rows of a ``collect_status`` report, as the dashboard wants."""
    owned: Counter[str] = Counter(p["owner"] for p in report["partitions"] if p["owner"])
    workers = [{"worker": w, "partitions": owned.get(w, 0)} for w in report["workers"]]
    partitions = [
        {
            "partition": p["partition"],
            "owner": p["owner"],
            "lag": p["lag"],
            "outbox": p["outbox"],
            "watermark_age": (
                None if p["watermark_age_ms"] is None else p["watermark_age_ms"] / 1000
            ),
            "applied": p["applied"],
            "expired": p["expired"],
            "instances": p["instances"],
        }
        for p in report["partitions"]
    ]
    return workers, partitions


class OperatorSampler:
    """Samples the cluster's state; ``latest`` is the operator JSON (None before the first)."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.interval = settings.gateway.operator_interval
        points = int(HISTORY_SECONDS / self.interval) + 1
        self._rate: deque[list[float]] = deque(maxlen=points)
        self._lag: dict[str, deque[list[float]]] = {}
        self._points = points
        self._last: tuple[float, int] | None = None
        self._failures = RetryLog(log, "operator sample")
        self.latest: dict[str, Any] | None = None

    async def run(self) -> None:
        """Sample until cancelled (a failed sample is logged once per streak and kept as
        the sample's ``error``; the last good figures stay shown)."""
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)  # the sampling period

    async def sample(self) -> dict[str, Any]:
        now = time.time()
        error: str | None = None
        try:
            report = await collect_status(self.settings)
            _total, letters = await read_dead_letters(
                self.settings, limit=DEADLETTER_READ, wait=0.2
            )
        except BusregError as exc:
            self._failures.failed(exc)
            error = str(exc)
        else:
            self._failures.recovered()
            workers, partitions = operator_view(report)
            deadletters = dict(sorted(Counter(str(x["reason"]) for x in letters).items()))
            for p in partitions:
                self._lag.setdefault(str(p["partition"]), deque(maxlen=self._points)).append(
                    [round(now, 3), p["lag"]]
                )
            self.latest = {
                "enabled": True,
                "at": round(now, 3),
                "namespace": self.settings.namespace,
                "workers": workers,
                "partitions": partitions,
                "deadletters": deadletters,
            }
        seq = self.catalog.seq
        if self._last is not None and now > self._last[0]:
            rate = (seq - self._last[1]) / (now - self._last[0])
            self._rate.append([round(now, 3), round(rate, 3)])
        self._last = (now, seq)
        if self.latest is None:
            self.latest = {
                "enabled": True,
                "at": round(now, 3),
                "namespace": self.settings.namespace,
                "workers": [],
                "partitions": [],
                "deadletters": {},
            }
        self.latest["error"] = error
        self.latest["history"] = {
            "changes_per_second": list(self._rate),
            "lag": {k: list(v) for k, v in sorted(self._lag.items(), key=lambda kv: int(kv[0]))},
        }
        self.catalog.publish(Event("operator", orjson.dumps(self.latest)))
        return self.latest


async def operator_endpoint(request: Request) -> Response:
    """The latest operator sample, or ``{"enabled": false}`` when operator pages are off."""
    query(request, NoQuery)
    sampler = getattr(request.app.state, "operator", None)
    if not isinstance(sampler, OperatorSampler):
        return JSONResponse({"enabled": False})
    if sampler.latest is None:
        return error_response(503, "the first operator sample is still being taken")
    return JSONResponse(sampler.latest)
