"""The subset of Consul's HTTP API that Prometheus' ``consul_sd_config`` (and other tools
reading Consul's catalog) use, answered from the catalog.

* ``GET /v1/agent/self``: ``{"Config": {"Datacenter": <namespace>, ...}}`` (Prometheus reads
  only ``Config.Datacenter``, when its config names no datacenter);
* ``GET /v1/catalog/services``: ``{service: [tags]}``, services with at least one instance;
* ``GET /v1/catalog/service/<name>``: CatalogService rows (``ServiceAddress``,
  ``ServicePort``, ``ServiceTags``, ``ServiceMeta``, ...);
* ``GET /v1/health/service/<name>``: ServiceEntry rows ``{"Node", "Service", "Checks"}``,
  what Prometheus reads for targets; ``?passing`` keeps UP instances, ``?tag=`` filters.

Blocking queries: with ``?index=N`` (from ``X-Consul-Index``) a request holds until its
answer's index differs from N or ``wait`` (Go duration, default 5m, at most 10m) passes.
The index of an answer changes exactly when its content changes (catalog.AnswerIndex).

busreg has no nodes: each instance's host is its node; the namespace is the datacenter.
Instance status maps to one check: UP passing, STARTING warning, DOWN critical,
OUT_OF_SERVICE maintenance. Tags: ``zone=<zone>`` plus the instance's ``tags`` metadata
(comma-separated), so ``consul_sd_config``'s ``tags`` filter can select by zone.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from busreg.gateway.api import NoQuery, catalog_of, query, service_name
from busreg.gateway.catalog import Catalog, digest
from busreg.wire.models import Instance, InstanceStatus

__all__ = ["ConsulQuery", "check_status", "parse_wait", "routes", "service_tags"]

#: Consul's default and largest blocking-query waits.
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_CHECKS = {
    InstanceStatus.UP: "passing",
    InstanceStatus.STARTING: "warning",
    InstanceStatus.DOWN: "critical",
    InstanceStatus.OUT_OF_SERVICE: "maintenance",
}


def parse_wait(value: str) -> float:
    """A Go duration ("120000ms", "5m", "1m30s"; a bare number is seconds, as Consul
    takes it) in seconds, capped at Consul's 10 minutes.

    >>> parse_wait("120000ms"), parse_wait("1m30s"), parse_wait("2")
    (120.0, 90.0, 2.0)
    """
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d*)?", text):
        seconds = float(text)
    else:
        pos, seconds = 0, 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError("must be a duration like 30s, 5m or 120000ms")
    return min(seconds, MAX_WAIT)


class ConsulQuery(NoQuery):
    """Consul's query parameters; the ones that do not change a busreg answer (``dc``,
    ``stale``, ``consistent``, ``cached``, ``ns``, ``partition``, ``near``) are accepted
    and ignored, as a single-datacenter Consul does."""

    index: int = Field(0, ge=0, description="blocking query: the X-Consul-Index last seen")
    wait: float = Field(DEFAULT_WAIT, description="blocking query: longest hold (Go duration)")
    passing: bool = Field(False, description="only instances whose check passes (UP)")
    tag: str | None = Field(None, description="only instances with this tag")
    node_meta: str | None = Field(None, alias="node-meta", description="key:value node filter")
    filter: str | None = None
    dc: str | None = None
    stale: str | None = None
    consistent: str | None = None
    cached: str | None = None
    ns: str | None = None
    partition: str | None = None
    near: str | None = None

    @field_validator("wait", mode="before")
    @classmethod
    def _wait(cls, value: object) -> object:
        return parse_wait(value) if isinstance(value, str) else value

    @field_validator("passing", mode="before")
    @classmethod
    def _flag(cls, value: object) -> object:
        # Consul takes a bare `?passing` as true
        return True if value == "" else value

    @field_validator("filter")
    @classmethod
    def _no_filter(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("filter expressions are not supported by the busreg gateway")
        return value


def _consul_query(request: Request) -> tuple[ConsulQuery, list[str]]:
    q = query(request, ConsulQuery)
    return q, request.query_params.getlist("tag")


def check_status(instance: Instance) -> str:
    return _CHECKS.get(instance.status, "critical")


def service_tags(instance: Instance) -> list[str]:
    extra = [t.strip() for t in instance.metadata.get("tags", "").split(",") if t.strip()]
    return [f"zone={instance.zone}", *sorted(set(extra))]


def _node(instance: Instance, dc: str) -> dict[str, Any]:
    return {
        "ID": "",
        "Node": instance.host,
        "Address": instance.host,
        "Datacenter": dc,
        "TaggedAddresses": {"lan": instance.host},
        "Meta": {"busreg_zone": instance.zone},
    }


def _service(instance: Instance) -> dict[str, Any]:
    return {
        "ID": instance.instance_id,
        "Service": instance.service,
        "Tags": service_tags(instance),
        "Address": instance.host,
        "Port": instance.port,
        "Meta": dict(sorted(instance.metadata.items())),
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
    }


def health_entry(instance: Instance, dc: str) -> dict[str, Any]:
    """One ServiceEntry of ``/v1/health/service/<name>``."""
    status = check_status(instance)
    return {
        "Node": _node(instance, dc),
        "Service": _service(instance),
        "Checks": [
            {
                "Node": instance.host,
                "CheckID": f"service:{instance.instance_id}",
                "Name": "busreg lease",
                "Status": status,
                "Notes": "",
                "Output": f"busreg status {instance.status.value}",
                "ServiceID": instance.instance_id,
                "ServiceName": instance.service,
                "ServiceTags": service_tags(instance),
                "Type": "ttl",
            }
        ],
    }


def catalog_entry(instance: Instance, dc: str) -> dict[str, Any]:
    """One CatalogService of ``/v1/catalog/service/<name>``."""
    node, service = _node(instance, dc), _service(instance)
    return {
        "ID": "",
        "Node": node["Node"],
        "Address": node["Address"],
        "Datacenter": dc,
        "TaggedAddresses": node["TaggedAddresses"],
        "NodeMeta": node["Meta"],
        "ServiceID": service["ID"],
        "ServiceName": service["Service"],
        "ServiceTags": service["Tags"],
        "ServiceAddress": service["Address"],
        "ServicePort": service["Port"],
        "ServiceMeta": service["Meta"],
        "ServiceWeights": service["Weights"],
        "ServiceEnableTagOverride": False,
    }


def _selected(instances: dict[str, Instance], q: ConsulQuery, tags: list[str]) -> list[Instance]:
    node_meta = None
    if q.node_meta is not None:
        key, _, value = q.node_meta.partition(":")
        node_meta = (key, value)
    out = []
    for iid in sorted(instances):
        inst = instances[iid]
        if q.passing and inst.status is not InstanceStatus.UP:
            continue
        if tags and not set(tags) <= set(service_tags(inst)):
            continue
        if node_meta is not None and node_meta != ("busreg_zone", inst.zone):
            continue
        out.append(inst)
    return out


def _datacenter(request: Request) -> str:
    return str(request.app.state.settings.namespace)


async def _blocking(
    request: Request, key: Hashable, q: ConsulQuery, answer: Callable[[Catalog], Any]
) -> Response:
    """Answer now, or when the answer's index moves past ``q.index``, or after ``wait``."""
    catalog = catalog_of(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + q.wait
    while True:
        generation = catalog.generation
        body = answer(catalog)
        index = catalog.answers.index(key, digest(body), generation)
        # an index other than the client's (higher, or lower after a gateway restart,
        # which tells a Consul client to start over) answers at once
        if q.index == 0 or index != q.index:
            break
        left = deadline - loop.time()
        if left <= 0 or not await catalog.wait_mutation(generation, left):
            break
    return JSONResponse(
        body,
        headers={
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        },
    )


async def agent_self(request: Request) -> Response:
    """What Prometheus asks first: the datacenter (``Config.Datacenter``)."""
    query(request, NoQuery)
    dc = _datacenter(request)
    return JSONResponse(
        {
            "Config": {
                "Datacenter": dc,
                "PrimaryDatacenter": dc,
                "NodeName": "busreg-gateway",
                "NodeID": "",
                "Server": False,
                "Version": "0.0.0+busreg",
            },
            "Member": {"Name": "busreg-gateway", "Tags": {"dc": dc}},
            "Meta": {"busreg": "gateway"},
        }
    )


async def catalog_services(request: Request) -> Response:
    """``{service: [tags]}`` of every service with at least one instance (blocking)."""
    q, tags = _consul_query(request)

    def answer(catalog: Catalog) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in sorted(catalog.entries):
            selected = _selected(catalog.entries[name].instances, q, tags)
            if selected:
                out[name] = sorted({t for i in selected for t in service_tags(i)})
        return out

    key = ("catalog-services", q.passing, tuple(sorted(tags)), q.node_meta)
    return await _blocking(request, key, q, answer)


def _one_service(
    request: Request, kind: str, row: Callable[[Instance, str], dict[str, Any]]
) -> Callable[[], Awaitable[Response]]:
    name = service_name(request)
    q, tags = _consul_query(request)
    dc = _datacenter(request)

    def answer(catalog: Catalog) -> list[dict[str, Any]]:
        entry = catalog.entries.get(name)
        if entry is None:
            return []  # Consul answers an unknown service with an empty list, not 404
        return [row(i, dc) for i in _selected(entry.instances, q, tags)]

    key = (kind, name, q.passing, tuple(sorted(tags)), q.node_meta)

    async def respond() -> Response:
        return await _blocking(request, key, q, answer)

    return respond


async def health_service(request: Request) -> Response:
    """ServiceEntry rows of one service (blocking); what consul_sd_config reads."""
    return await _one_service(request, "health", health_entry)()


async def catalog_service(request: Request) -> Response:
    """CatalogService rows of one service (blocking)."""
    return await _one_service(request, "catalog", catalog_entry)()


def routes() -> list[BaseRoute]:
    get = ["GET"]
    return [
        Route("/v1/agent/self", agent_self, methods=get),
        Route("/v1/catalog/services", catalog_services, methods=get),
        Route("/v1/catalog/service/{service}", catalog_service, methods=get),
        Route("/v1/health/service/{service}", health_service, methods=get),
    ]
