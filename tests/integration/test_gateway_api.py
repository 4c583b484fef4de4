"""``busreg gateway`` as a real process on real servers: the JSON API, SSE with resume by
revision, 4xx on bad input, the auth guard, the stream bound, a clean SIGTERM; and
``create_app`` mounted inside another Starlette app (in process).

Responses are checked against the OpenAPI document the gateway serves (/openapi.json), so
the committed schema and the live answers cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator

from busreg import Registry, Settings
from busreg.server.worker import Worker

from .helpers import GatewayProcess, eventually, gateway_process, log_tail

pytestmark = pytest.mark.servers


class Events:
    """An SSE reader over an httpx streaming response: ``await events.next()``."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next event (comments and ``retry:`` skipped): {"event", "id", "data"}."""
        event: dict[str, Any] = {}
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if line == "":
                    if "event" in event:
                        return event
                    event = {}
                    continue
                field, _, value = line.partition(": ")
                if field == "event":
                    event["event"] = value
                elif field == "id":
                    event["id"] = int(value)
                elif field == "data":
                    event["data"] = orjson.loads(value)
        raise AssertionError("the stream ended")


@contextlib.asynccontextmanager
async def sse(
    http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Events]:
    async with http.stream("GET", url, headers=headers, timeout=None) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Events(response)


@pytest.fixture
async def gateway(
    busreg_worker: Worker, busreg_namespace: Settings, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    async with gateway_process(busreg_namespace, tmp_path / "gateway.log") as gw:
        yield gw


async def _until(http: httpx.AsyncClient, url: str, ok: Any, what: str) -> Any:
    async def probe() -> Any:
        response = await http.get(url)
        return response.json() if response.status_code == 200 else None

    return await eventually(
        probe, lambda body: body is not None and ok(body), timeout=10, what=what
    )


def _validator(document: dict[str, Any], name: str) -> Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return Draft202012Validator(schema)


async def test_api_lists_and_gets_services_and_404s_unknown_ones(
    gateway: GatewayProcess, busreg_registry: Registry
) -> None:
    await busreg_registry.register("inventory", address="127.0.0.1:9101", zone="eu-1a")
    await busreg_registry.register(
        "inventory", address="127.0.0.1:9102", zone="eu-1b", status="DOWN", metadata={"v": "2"}
    )
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
        document = (await http.get("/openapi.json")).json()
        listing = await _until(
            http,
            "/api/v1/services",
            lambda b: any(
                s["service"] == "inventory" and s["instances"] == 2 for s in b["services"]
            ),
            "inventory with 2 instances",
        )
        _validator(document, "ServiceList").validate(listing)
        (row,) = [s for s in listing["services"] if s["service"] == "inventory"]
        assert row["by_status"] == {"DOWN": 1, "UP": 1}
        assert row["by_zone"] == {"eu-1a": 1, "eu-1b": 1}
        assert row["revision"] >= 2
        assert row["epoch"]

        detail = (await http.get("/api/v1/services/inventory")).json()
        _validator(document, "ServiceDetail").validate(detail)
        ids = [i["instance_id"] for i in detail["instances"]]
        assert ids == sorted(ids)
        assert {i["address"] for i in detail["instances"]} == {"127.0.0.1:9101", "127.0.0.1:9102"}
        assert all(i["since"] <= i["changed"] for i in detail["instances"])
        assert detail["revision"] == row["revision"]

        missing = await http.get("/api/v1/services/nosuch")
        assert missing.status_code == 404
        assert missing.json() == {
            "error": "no such service: nosuch",
            "service": "nosuch",
            "revision": 0,
        }
        _validator(document, "Error").validate(missing.json())

        changes = (await http.get("/api/v1/changes", params={"limit": 10})).json()
        _validator(document, "ChangeList").validate(changes)
        seqs = [c["seq"] for c in changes["changes"]]
        assert seqs == sorted(seqs)


async def test_service_events_resume_by_revision(
    gateway: GatewayProcess, busreg_registry: Registry
) -> None:
    await busreg_registry.register("cart", address="127.0.0.1:9201")
    url = "/api/v1/services/cart/events"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
        await _until(http, "/api/v1/services/cart", lambda b: len(b["instances"]) == 1, "cart")
        async with sse(http, url) as events:
            snapshot = await events.next()
            assert snapshot["event"] == "snapshot"
            assert snapshot["id"] == snapshot["data"]["revision"]
            assert len(snapshot["data"]["instances"]) == 1
            second = await busreg_registry.register("cart", address="127.0.0.1:9202")
            delta = await events.next()
            assert delta["event"] == "delta"
            assert delta["data"]["kind"] == "added"
            assert delta["data"]["instance"]["instance_id"] == second.instance_id
            assert delta["id"] == delta["data"]["revision"] == snapshot["id"] + 1
        seen = delta["id"]
        # while disconnected: one more change; the reconnect gets just that delta
        third = await busreg_registry.register("cart", address="127.0.0.1:9203")
        await _until(http, "/api/v1/services/cart", lambda b: b["revision"] > seen, "rev")
        async with sse(http, url, {"Last-Event-ID": str(seen)}) as events:
            resumed = await events.next()
            assert resumed["event"] == "delta"
            assert resumed["id"] == seen + 1
            assert resumed["data"]["instance"]["instance_id"] == third.instance_id
            await third.deregister()
            removed = await events.next()
            assert removed["data"]["kind"] == "removed"
            assert removed["data"]["reason"] == "deregistered"
            assert removed["id"] == seen + 2
        # a revision the gateway cannot continue from (ahead of it): a fresh snapshot
        async with sse(http, url, {"Last-Event-ID": "999999"}) as events:
            fresh = await events.next()
            assert fresh["event"] == "snapshot"
            assert fresh["id"] == seen + 2
            assert len(fresh["data"]["instances"]) == 2


async def test_dashboard_events_state_then_changes(
    gateway: GatewayProcess, busreg_registry: Registry
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
        async with sse(http, "/api/v1/events") as events:
            state = await events.next()
            assert state["event"] == "state"
            assert set(state["data"]) == {"index", "services", "changes"}
            reg = await busreg_registry.register("search", address="127.0.0.1:9301")
            change = await events.next()
            assert change["event"] == "change"
            assert change["data"]["service"] == "search"
            assert change["data"]["instance"]["instance_id"] == reg.instance_id
            assert change["id"] == change["data"]["seq"] > state["data"]["index"]
        operator = (await http.get("/api/v1/operator")).json()
        assert operator == {"enabled": False}


async def test_bad_input_gets_a_clear_4xx(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
        cases = {
            "/api/v1/changes?limit=0": "limit",
            "/api/v1/changes?limit=many": "limit",
            "/api/v1/services?sort=name": "sort",
            "/prometheus/sd?service=bad%20name": "service",
            "/v1/health/service/x?wait=forever": "wait",
            "/v1/health/service/x?index=-1": "index",
            "/v1/catalog/services?filter=Service%20==%20x": "filter",
        }
        for path, parameter in cases.items():
            response = await http.get(path)
            assert response.status_code == 400, path
            body = response.json()
            assert body["parameter"] == parameter, body
            assert parameter in body["error"], body
        bad_name = await http.get("/api/v1/services/bad%20name")
        assert bad_name.status_code == 400
        assert "invalid service name" in bad_name.json()["error"]
        bad_id = await http.get("/api/v1/services/x/events", headers={"Last-Event-ID": "x"})
        assert bad_id.status_code == 400
        assert "Last-Event-ID" in bad_id.json()["error"]
        post = await http.post("/api/v1/services")
        assert post.status_code == 405
        assert "read-only" in post.json()["error"]
        unknown = await http.get("/api/v2/nothing")
        assert unknown.status_code == 404
        assert "error" in unknown.json()
        # headers past gateway.max_header_bytes (16 KiB) are refused before the app runs
        huge = await http.get("/healthz", headers={"x-filler": "a" * 40_000})
        assert 400 <= huge.status_code < 500
        assert (await http.get("/healthz")).status_code == 200


async def test_auth_guard(
    busreg_worker: Worker, busreg_namespace: Settings, tmp_path: Path
) -> None:
    token, users = "s3cret-token", "alice:wonder,bob:builder"
    async with (
        gateway_process(
            busreg_namespace,
            tmp_path / "gateway.log",
            BUSREG_GATEWAY__AUTH__TOKEN=token,
            BUSREG_GATEWAY__AUTH__USERS=users,
        ) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=5) as http,
    ):
        refused: list[dict[str, Any]] = [
            {},
            {"headers": {"authorization": "Bearer wrong"}},
            {"auth": ("alice", "wrong")},
            {"auth": ("mallory", "wonder")},
            {"headers": {"authorization": "Basic !!notbase64"}},
            {"headers": {"x-consul-token": "wrong"}},
        ]
        for path in ("/api/v1/services", "/healthz", "/prometheus/sd", "/v1/agent/self", "/"):
            for how in refused:
                response = await http.get(path, **how)
                assert response.status_code == 401, (path, how)
                assert response.json()["error"].startswith("authentication required")
                assert response.headers["www-authenticate"].startswith("Basic")
        allowed: list[dict[str, Any]] = [
            {"headers": {"authorization": f"Bearer {token}"}},
            {"auth": ("alice", "wonder")},
            {"auth": ("bob", "builder")},
            {"headers": {"x-consul-token": token}},
        ]
        for how in allowed:
            assert (await http.get("/api/v1/services", **how)).status_code == 200, how
        # the secrets never reach the log
        log = log_tail(gw.log, 400)
        assert token not in log
        assert "wonder" not in log


async def test_stream_bound_and_clean_sigterm_with_streams_open(
    busreg_worker: Worker, busreg_namespace: Settings, tmp_path: Path
) -> None:
    async with (
        gateway_process(
            busreg_namespace, tmp_path / "gateway.log", BUSREG_GATEWAY__MAX_STREAMS="2"
        ) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=5) as http,
        sse(http, "/api/v1/events") as one,
        sse(http, "/api/v1/events") as two,
    ):
        assert (await one.next())["event"] == "state"
        assert (await two.next())["event"] == "state"
        third = await http.get("/api/v1/events")
        assert third.status_code == 503
        assert third.json()["limit"] == "gateway.max_streams"
        assert (await http.get("/api/v1/services")).status_code == 200
        # SIGTERM with two streams open: they end, the process exits 0, quickly
        began = time.monotonic()
        code = await asyncio.to_thread(gw.stop)
        assert code == 0, log_tail(gw.log)
        assert time.monotonic() - began < 5, "open streams held the shutdown"
    assert "Application shutdown complete" in log_tail(gw.log)


async def test_create_app_mounts_in_another_starlette_app(
    busreg_worker: Worker, busreg_namespace: Settings, busreg_registry: Registry
) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from busreg.gateway import create_app

    gateway = create_app(busreg_namespace)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the user's own app")

    outer = Starlette(
        routes=[Route("/", home), Mount("/registry", app=gateway)],
        # a mounted app's lifespan is not run by Starlette: the outer app runs it
        lifespan=lambda app: gateway.router.lifespan_context(gateway),
    )
    await busreg_registry.register("mounted", address="127.0.0.1:9401")
    async with outer.router.lifespan_context(outer):
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            assert (await http.get("/")).text == "the user's own app"
            await _until(http, "/registry/healthz", lambda b: b["status"] == "ok", "healthy")
            body = await _until(
                http,
                "/registry/api/v1/services/mounted",
                lambda b: len(b["instances"]) == 1,
                "the mounted gateway to see the instance",
            )
            assert body["instances"][0]["address"] == "127.0.0.1:9401"
            assert (await http.get("/registry/api/v1/services/nope")).status_code == 404
