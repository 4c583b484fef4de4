"""The gateway's OpenAPI document, built from the code: the endpoint table below names each
route's handler (its docstring is the description), its query model and its response
model; the schemas come from those pydantic models. ``schemas/gateway-openapi.json`` is
this document, checked by tests/unit/test_gateway_openapi.py. Regenerate after a change::

    python -m busreg.gateway.openapi schemas/gateway-openapi.json
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from busreg.gateway import api, consul, operator, promsd, sse
from busreg.gateway.api import ChangesQuery, NoQuery
from busreg.gateway.consul import ConsulQuery
from busreg.gateway.promsd import SdQuery
from busreg.wire.models import Instance

__all__ = ["ENDPOINTS", "build_openapi", "main", "openapi_endpoint", "render"]

TITLE = "busreg gateway"
VERSION = "1"


class Error(BaseModel):
    """Every error: a message, sometimes with details (``service``, ``revision``, ...)."""

    model_config = ConfigDict(extra="allow")
    error: str


class GatewayInstance(Instance):
    """Instance JSON plus what the gateway saw: ``since`` (unix seconds it first saw this
    incarnation) and ``changed`` (its last change)."""

    since: float
    changed: float


class ServiceSummary(BaseModel):
    service: str
    epoch: str | None
    revision: int = Field(ge=0)
    instances: int = Field(ge=0)
    by_status: dict[str, int]
    by_zone: dict[str, int]


class ServiceList(BaseModel):
    index: int = Field(ge=0, description="the gateway-wide change counter (seq)")
    services: list[ServiceSummary]


class ServiceDetail(BaseModel):
    service: str
    epoch: str | None
    revision: int = Field(ge=0)
    instances: list[GatewayInstance]


class ChangeRecord(BaseModel):
    seq: int = Field(ge=1)
    at: float
    service: str
    epoch: str | None
    revision: int = Field(ge=0)
    kind: Literal["added", "modified", "removed"]
    reason: Literal["deregistered", "expired", "resync"] | None
    instance: GatewayInstance


class ChangeList(BaseModel):
    changes: list[ChangeRecord]


class Health(BaseModel):
    status: Literal["ok"]
    services: int = Field(ge=0)


class OperatorState(BaseModel):
    """``{"enabled": false}``, or a sample: workers, partitions, dead letters, history."""

    model_config = ConfigDict(extra="allow")
    enabled: bool


class SdGroup(BaseModel):
    targets: list[str]
    labels: dict[str, str]


class SdGroups(RootModel[list[SdGroup]]):
    """Prometheus http_sd target groups."""


class ConsulServices(RootModel[dict[str, list[str]]]):
    """Consul: service name -> tags."""


class ConsulRows(RootModel[list[dict[str, Any]]]):
    """Consul ServiceEntry / CatalogService rows (see docs/gateway.md for the fields)."""


class ConsulSelf(RootModel[dict[str, Any]]):
    """Consul agent info; ``Config.Datacenter`` is the namespace."""


@dataclass(frozen=True)
class Endpoint:
    path: str
    handler: Callable[[Request], Any]
    query: type[BaseModel]
    response: type[BaseModel] | None  # None: text/event-stream
    errors: tuple[int, ...] = (400,)
    blocking: bool = False


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/healthz", api.healthz, NoQuery, Health, (503,)),
    Endpoint("/api/v1/services", api.list_services, NoQuery, ServiceList),
    Endpoint("/api/v1/services/{service}", api.get_service, NoQuery, ServiceDetail, (400, 404)),
    Endpoint(
        "/api/v1/services/{service}/events", sse.service_events, NoQuery, None, (400, 404, 503)
    ),
    Endpoint("/api/v1/changes", api.changes, ChangesQuery, ChangeList),
    Endpoint("/api/v1/events", sse.dashboard_events, NoQuery, None, (400, 503)),
    Endpoint("/api/v1/operator", operator.operator_endpoint, NoQuery, OperatorState, (400, 503)),
    Endpoint("/prometheus/sd", promsd.http_sd, SdQuery, SdGroups),
    Endpoint("/v1/agent/self", consul.agent_self, NoQuery, ConsulSelf),
    Endpoint(
        "/v1/catalog/services", consul.catalog_services, ConsulQuery, ConsulServices, blocking=True
    ),
    Endpoint(
        "/v1/catalog/service/{service}",
        consul.catalog_service,
        ConsulQuery,
        ConsulRows,
        (400,),
        True,
    ),
    Endpoint(
        "/v1/health/service/{service}", consul.health_service, ConsulQuery, ConsulRows, (400,), True
    ),
)

_SSE = {
    "/api/v1/services/{service}/events": "event: snapshot (ServiceDetail, id: revision), then "
    "event: delta (ChangeRecord, id: revision); Last-Event-ID resumes.",
    "/api/v1/events": "event: state ({index, services, changes}), event: change (ChangeRecord, "
    "id: seq), event: operator (OperatorState); ': ping' every 15 s.",
}


def _parameters(endpoint: Endpoint, refs: dict[str, Any]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    if "{service}" in endpoint.path:
        params.append(
            {
                "name": "service",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"},
            }
        )
    schema = endpoint.query.model_json_schema(by_alias=True)
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if "description" in prop:
            param["description"] = prop["description"]
        params.append(param)
    if endpoint.path.endswith("/events") and "{service}" in endpoint.path:
        params.append(
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
            }
        )
    return params


def build_openapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [Error]
    models += [e.response for e in ENDPOINTS if e.response is not None]
    _, defs = models_json_schema(
        [(m, "serialization") for m in dict.fromkeys(models)],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = defs.get("$defs", {})
    error_ref = {"$ref": "#/components/schemas/Error"}
    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        doc = inspect.getdoc(e.handler) or ""
        summary, _, rest = doc.partition("\n")
        responses: dict[str, Any] = {}
        if e.response is None:
            responses["200"] = {
                "description": _SSE[e.path],
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        else:
            ok: dict[str, Any] = {
                "description": "OK",
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{e.response.__name__}"}
                    }
                },
            }
            if e.blocking:
                ok["headers"] = {
                    "X-Consul-Index": {"schema": {"type": "integer", "minimum": 1}},
                    "X-Consul-KnownLeader": {"schema": {"type": "string", "enum": ["true"]}},
                    "X-Consul-LastContact": {"schema": {"type": "integer"}},
                }
            responses["200"] = ok
        for code in (*e.errors, 401):
            responses[str(code)] = {
                "description": {
                    400: "bad parameter",
                    401: "credentials required",
                    404: "no such service (revision 0)",
                    503: "not ready or too many streams",
                }[code],
                "content": {"application/json": {"schema": error_ref}},
            }
        operation: dict[str, Any] = {
            "operationId": e.handler.__name__,
            "summary": " ".join(summary.split()),
            "parameters": _parameters(e, schemas),
            "responses": responses,
        }
        if rest.strip():
            operation["description"] = " ".join(rest.split())
        paths[e.path] = {"get": operation}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "busreg's read-only HTTP API, Prometheus http_sd and a Consul "
            "catalog subset (docs/gateway.md).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            },
        },
    }


def render(document: dict[str, Any]) -> str:
    import json

    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


_CACHE: dict[str, bytes] = {}


async def openapi_endpoint(request: Request) -> Response:
    """This document."""
    if "doc" not in _CACHE:
        _CACHE["doc"] = render(build_openapi()).encode()
    return Response(_CACHE["doc"], media_type="application/json")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(
            "usage: python -m busreg.gateway.openapi schemas/gateway-openapi.json", file=sys.stderr
        )
        return 2
    Path(args[0]).write_text(render(build_openapi()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
