"""The JSON API: services, one service, recent changes, health; and the error shape.

Every error is ``{"error": "<message>", ...}`` with its status code. Query parameters are
validated by pydantic models (``query``) and refused with 400 naming the parameter.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from busreg.gateway.catalog import Catalog
from busreg.wire.models import ServiceName, first_error

__all__ = [
    "ApiError",
    "ChangesQuery",
    "NoQuery",
    "catalog_of",
    "changes",
    "error_response",
    "get_service",
    "healthz",
    "list_services",
    "query",
    "service_name",
]

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error answered as ``{"error": message, **extra}`` with ``status``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


class NoQuery(BaseModel):
    """Endpoints without parameters still refuse unknown ones (a typo is an error)."""

    model_config = ConfigDict(extra="forbid")


class ChangesQuery(NoQuery):
    limit: int = Field(100, ge=1, le=100_000, description="newest changes to return")


def error_response(code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=code)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, **exc.extra)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {
        404: f"not found: {request.url.path}",
        405: f"method {request.method} not allowed: the gateway is read-only",
    }.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, message)


def query(request: Request, model: type[M]) -> M:
    """The request's query parameters as ``model``; 400 with the first problem."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        where, message = first_error(exc)
        raise ApiError(400, f"query parameter {where}: {message}", parameter=where) from None


_service_name: TypeAdapter[str] = TypeAdapter(ServiceName)


def service_name(request: Request) -> str:
    name = str(request.path_params["service"])
    try:
        return _service_name.validate_python(name)
    except ValidationError:
        raise ApiError(
            400, f"invalid service name {name!r}: letters, digits, '_', '.', '-' (max 100)"
        ) from None


def catalog_of(request: Request) -> Catalog:
    catalog = getattr(request.app.state, "catalog", None)
    if not isinstance(catalog, Catalog):
        raise ApiError(503, "the gateway is not running (its lifespan has not started)")
    return catalog


async def list_services(request: Request) -> Response:
    """Every service with its instance counts by status and zone, sorted by name."""
    query(request, NoQuery)
    catalog = catalog_of(request)
    return JSONResponse({"index": catalog.seq, "services": catalog.services()})


async def get_service(request: Request) -> Response:
    """One service's instances with its epoch and revision; 404 with revision 0 when the
    gateway knows no such service (it never had an instance, like a snapshot's revision 0)."""
    query(request, NoQuery)
    name = service_name(request)
    entry = catalog_of(request).entries.get(name)
    if entry is None:
        raise ApiError(404, f"no such service: {name}", service=name, revision=0)
    return JSONResponse(entry.detail())


async def changes(request: Request) -> Response:
    """The newest recent changes of every service, newest last."""
    q = query(request, ChangesQuery)
    return JSONResponse({"changes": catalog_of(request).recent(q.limit)})


async def healthz(request: Request) -> Response:
    """ok once the first service listing is loaded; 503 before."""
    catalog = catalog_of(request)
    if not catalog.loaded.is_set():
        return error_response(503, "loading the service catalog", status="loading")
    return JSONResponse({"status": "ok", "services": len(catalog.entries)})
