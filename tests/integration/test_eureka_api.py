"""The Eureka REST contract of the gateway, on real servers: every endpoint in JSON and XML
with Eureka's codes (204/200/404/400), ``apps__hashcode`` and ``actionType`` in the delta,
gzip, the status override and metadata PUT, and auth (basic users mapped to services; the
gateway signs events in ``enforce`` mode; read-only without users).

The gateway runs as a real ``busreg gateway`` process, its Eureka API at /eureka configured
with ``BUSREG_GATEWAY__EUREKA__*``. The helpers here are shared with
test_eureka_clients.py (the real py-eureka-client).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from busreg import Registry, Settings
from busreg.gateway.eureka import codec
from busreg.server.worker import Worker
from busreg.settings import AuthSettings
from busreg.testing import running_worker

from .helpers import eventually, gateway_process

pytestmark = pytest.mark.servers


@dataclass
class Gateway:
    url: str  # the Eureka base URL, ending in /eureka
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.asynccontextmanager
async def eureka_gateway(
    settings: Settings, log: Path, eureka: dict[str, Any] | None = None, **env: str
) -> AsyncIterator[Gateway]:
    """A ``busreg gateway`` process for ``settings``' namespace, its Eureka API set up with
    ``BUSREG_GATEWAY__EUREKA__<FIELD>`` from ``eureka`` (default: anonymous writes allowed),
    healthy before it is yielded; SIGTERMed (killed if it hangs) afterwards."""
    given = {"allow_anonymous_writes": True} if eureka is None else eureka
    fields = {
        f"BUSREG_GATEWAY__EUREKA__{key.upper()}": (
            json.dumps(value) if isinstance(value, bool) else str(value)
        )
        for key, value in given.items()
    }
    async with gateway_process(settings, log, **fields, **env) as gw:
        yield Gateway(f"{gw.url}/eureka", gw.proc, gw.log)


def registration(
    app: str, iid: str, port: int, *, dirty: int | None = None, **extra: Any
) -> dict[str, Any]:
    """An instance document as py-eureka-client builds it (JSON shape)."""
    doc: dict[str, Any] = {
        "instanceId": iid,
        "hostName": "localhost",
        "app": app.upper(),
        "ipAddr": "127.0.0.1",
        "status": "UP",
        "overriddenstatus": "UNKNOWN",
        "port": {"$": port, "@enabled": "true"},
        "securePort": {"$": 443, "@enabled": "false"},
        "countryId": 1,
        "dataCenterInfo": {
            "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
            "name": "MyOwn",
        },
        "leaseInfo": {"renewalIntervalInSecs": 1, "durationInSecs": 3},
        "metadata": {"management.port": str(port)},
        "homePageUrl": f"http://localhost:{port}/",
        "statusPageUrl": f"http://localhost:{port}/info",
        "healthCheckUrl": f"http://localhost:{port}/health",
        "vipAddress": app.lower(),
        "secureVipAddress": app.lower(),
        "lastUpdatedTimestamp": str(dirty or int(time.time() * 1000)),
        "lastDirtyTimestamp": str(dirty or int(time.time() * 1000)),
        "isCoordinatingDiscoveryServer": "false",
    }
    doc.update(extra)
    return doc


def body_of(doc: dict[str, Any], fmt: str) -> tuple[bytes, dict[str, str]]:
    """A registration body in ``fmt`` ("json" or "xml") with its content type."""
    if fmt == "json":
        return orjson.dumps({"instance": doc}), {"content-type": "application/json"}
    return codec.encode("instance", doc, as_json=False), {"content-type": "application/xml"}


def accept(fmt: str) -> dict[str, str]:
    return {"accept": "application/json"} if fmt == "json" else {}


def parse_apps(response: httpx.Response, fmt: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    kind = response.headers["content-type"]
    assert ("json" in kind) == (fmt == "json"), kind
    return codec.decode_applications(response.content, as_json=fmt == "json")


def parse_one(response: httpx.Response, root: str, fmt: str) -> Any:
    assert response.status_code == 200, response.text
    if fmt == "json":
        return orjson.loads(response.content)[root]
    if root == "instance":
        return codec.decode_instance(response.content, as_json=False)
    doc = codec.decode_applications(
        b"<applications>" + response.content + b"</applications>", as_json=False
    )
    return doc["application"][0]


async def adopted(http: httpx.AsyncClient, base: str, service: str) -> None:
    """Wait until the gateway's catalog follows ``service`` (H1's /api/v1 API)."""
    url = base.rsplit("/eureka", 1)[0] + f"/api/v1/services/{service}"

    async def status() -> int:
        return (await http.get(url)).status_code

    await eventually(status, lambda code: code == 200, timeout=10, what=f"catalog has {service}")


def instances_of(apps: dict[str, Any], app: str) -> dict[str, dict[str, Any]]:
    for entry in apps["application"]:
        if entry["name"] == app:
            return {i["instanceId"]: i for i in entry["instance"]}
    return {}


# --- contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "xml"])
async def test_contract(
    busreg_worker: Worker, busreg_registry: Registry, tmp_path: Path, fmt: str
) -> None:
    settings = busreg_registry.settings
    view = await busreg_registry.watch("orders")
    async with (
        eureka_gateway(settings, tmp_path / "gw.log") as gw,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        base, h = gw.url, accept(fmt)
        # register: 204, then visible to a native watcher and to every Eureka read
        body, ctype = body_of(registration("orders", "o-1", 8081), fmt)
        r = await http.post(f"{base}/apps/ORDERS", content=body, headers=ctype)
        assert r.status_code == 204, r.text
        await view.wait_for(lambda now: "o-1" in now, timeout=5)
        native = view.instances["o-1"]
        # the catalog adopts a new service at its next listing (0.2 s here): from then on
        # its changes are logged for /apps/delta (before, the delta shows it as ADDED)
        await adopted(http, base, "orders")
        assert (native.address, native.ttl, native.zone) == ("127.0.0.1:8081", 3.0, "default")
        assert native.metadata["management.port"] == "8081"

        for path in ("/apps", "/apps/"):
            apps = parse_apps(await http.get(base + path, headers=h), fmt)
            assert apps["apps__hashcode"] == "UP_1_"
            inst = instances_of(apps, "ORDERS")["o-1"]
            assert inst["port"] in (
                {"$": 8081, "@enabled": "true"},
                {"$": "8081", "@enabled": "true"},
            )
            assert inst["hostName"] == "localhost"
            assert inst["healthCheckUrl"] == "http://localhost:8081/health"
            assert inst["dataCenterInfo"]["@class"].endswith("DefaultDataCenterInfo")
            assert str(inst["leaseInfo"]["durationInSecs"]) == "3"

        app = parse_one(await http.get(f"{base}/apps/orders", headers=h), "application", fmt)
        assert app["name"] == "ORDERS"
        assert (await http.get(f"{base}/apps/NOPE", headers=h)).status_code == 404
        one = parse_one(await http.get(f"{base}/apps/ORDERS/o-1", headers=h), "instance", fmt)
        assert one["instanceId"] == "o-1"
        assert one["status"] == "UP"
        assert (await http.get(f"{base}/apps/ORDERS/nope", headers=h)).status_code == 404
        by_id = parse_one(await http.get(f"{base}/instances/o-1", headers=h), "instance", fmt)
        assert by_id["app"] == "ORDERS"
        assert (await http.get(f"{base}/instances/nope", headers=h)).status_code == 404
        vip = parse_apps(await http.get(f"{base}/vips/orders", headers=h), fmt)
        assert set(instances_of(vip, "ORDERS")) == {"o-1"}
        none = parse_apps(await http.get(f"{base}/vips/other", headers=h), fmt)
        assert none["application"] == []
        assert instances_of(
            parse_apps(await http.get(f"{base}/svips/orders", headers=h), fmt), "ORDERS"
        )

        # delta: the registration is ADDED; the hashcode is the whole registry's
        delta = parse_apps(await http.get(f"{base}/apps/delta", headers=h), fmt)
        assert instances_of(delta, "ORDERS")["o-1"]["actionType"] == "ADDED"
        assert delta["apps__hashcode"] == "UP_1_"

        # renew: 200; unknown: 404; a client with newer data: 404 (it registers again)
        dirty = one["lastDirtyTimestamp"]
        r = await http.put(
            f"{base}/apps/ORDERS/o-1", params={"status": "UP", "lastDirtyTimestamp": dirty}
        )
        assert r.status_code == 200, r.text
        assert (await http.put(f"{base}/apps/ORDERS/nope")).status_code == 404
        newer = str(int(dirty) + 1000)
        r = await http.put(f"{base}/apps/ORDERS/o-1", params={"lastDirtyTimestamp": newer})
        assert r.status_code == 404

        # status override: OUT_OF_SERVICE shows in status, overriddenStatus and the hashcode
        r = await http.put(f"{base}/apps/ORDERS/o-1/status", params={"value": "OUT_OF_SERVICE"})
        assert r.status_code == 200, r.text
        await view.wait_for(lambda now: now["o-1"].status.value == "OUT_OF_SERVICE", timeout=5)
        one = parse_one(await http.get(f"{base}/apps/ORDERS/o-1", headers=h), "instance", fmt)
        assert (one["status"], one["overriddenStatus"]) == ("OUT_OF_SERVICE", "OUT_OF_SERVICE")
        apps = parse_apps(await http.get(f"{base}/apps", headers=h), fmt)
        assert apps["apps__hashcode"] == "OUT_OF_SERVICE_1_"
        # a renewal keeps the override (it is the instance's own status that renews)
        assert (await http.put(f"{base}/apps/ORDERS/o-1")).status_code == 200
        bad = await http.put(f"{base}/apps/ORDERS/o-1/status", params={"value": "SIDEWAYS"})
        assert bad.status_code == 400
        assert "value" in bad.json()["error"]
        r = await http.put(f"{base}/apps/ORDERS/nope/status", params={"value": "DOWN"})
        assert r.status_code == 404
        assert (await http.delete(f"{base}/apps/ORDERS/o-1/status")).status_code == 200
        await view.wait_for(lambda now: now["o-1"].override is None, timeout=5)
        assert view.instances["o-1"].status.value == "UP"
        assert (await http.delete(f"{base}/apps/ORDERS/nope/status")).status_code == 404

        # metadata PUT merges into the instance's metadata
        r = await http.put(f"{base}/apps/ORDERS/o-1/metadata", params={"version": "2.1"})
        assert r.status_code == 200, r.text
        await view.wait_for(lambda now: now["o-1"].metadata.get("version") == "2.1", timeout=5)
        one = parse_one(await http.get(f"{base}/apps/ORDERS/o-1", headers=h), "instance", fmt)
        assert one["metadata"]["version"] == "2.1"
        assert one["metadata"]["management.port"] == "8081"
        r = await http.put(f"{base}/apps/ORDERS/o-1/metadata", params={"eureka.port": "1"})
        assert r.status_code == 400
        assert (
            await http.put(f"{base}/apps/ORDERS/nope/metadata", params={"a": "b"})
        ).status_code == 404

        # gzip when asked
        r = await http.get(f"{base}/apps", headers={**h, "accept-encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        raw = await http.get(f"{base}/apps", headers={**h, "accept-encoding": "identity"})
        assert "content-encoding" not in raw.headers
        assert gzip.decompress(await _raw_gzip(base, h)) == raw.content

        # cancel: 200, gone for everyone, DELETED in the delta; a second cancel is 404
        assert (await http.delete(f"{base}/apps/ORDERS/o-1")).status_code == 200
        await view.wait_for(lambda now: "o-1" not in now, timeout=5)
        assert (await http.get(f"{base}/apps/ORDERS/o-1", headers=h)).status_code == 404
        delta = parse_apps(await http.get(f"{base}/apps/delta", headers=h), fmt)
        assert instances_of(delta, "ORDERS")["o-1"]["actionType"] == "DELETED"
        assert delta["apps__hashcode"] == ""
        assert (await http.delete(f"{base}/apps/ORDERS/o-1")).status_code == 404


async def _raw_gzip(base: str, headers: dict[str, str]) -> bytes:
    """The gzipped body as sent (httpx would decode it)."""
    async with (
        httpx.AsyncClient(timeout=5.0) as http,
        http.stream("GET", f"{base}/apps", headers={**headers, "accept-encoding": "gzip"}) as r,
    ):
        return b"".join([chunk async for chunk in r.aiter_raw()])


@pytest.mark.parametrize("fmt", ["json", "xml"])
async def test_register_refusals(
    busreg_worker: Worker, busreg_registry: Registry, tmp_path: Path, fmt: str
) -> None:
    """Eureka's 400s, each with a message; nothing is registered."""
    async with (
        eureka_gateway(busreg_registry.settings, tmp_path / "gw.log") as gw,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        good = registration("orders", "o-1", 8081)
        cases = {
            "Missing hostname": {**good, "hostName": ""},
            "Missing ip address": {k: v for k, v in good.items() if k != "ipAddr"},
            "Mismatched appName": {**good, "app": "BILLING"},
            "Missing dataCenterInfo": {k: v for k, v in good.items() if k != "dataCenterInfo"},
            "Missing instanceId": {**good, "instanceId": "", "hostName": ""},
            "port must be 1-65535": {**good, "port": {"$": 0, "@enabled": "true"}},
            "ttl": {**good, "leaseInfo": {"durationInSecs": 600}},
        }
        for expected, doc in cases.items():
            body, ctype = body_of(doc, fmt)
            r = await http.post(f"{gw.url}/apps/ORDERS", content=body, headers=ctype)
            assert r.status_code == 400, (expected, r.text)
            assert expected.lower() in r.json()["error"].lower(), (expected, r.text)
        garbage = b"{not json" if fmt == "json" else b"<instance><unclosed></instance>"
        ctype = {"content-type": f"application/{fmt}"}
        r = await http.post(f"{gw.url}/apps/ORDERS", content=garbage, headers=ctype)
        assert r.status_code == 400
        bomb = b'<!DOCTYPE x [<!ENTITY a "aaaa">]><instance>&a;</instance>'
        r = await http.post(
            f"{gw.url}/apps/ORDERS", content=bomb, headers={"content-type": "application/xml"}
        )
        assert r.status_code == 400
        apps = parse_apps(await http.get(f"{gw.url}/apps", headers=accept(fmt)), fmt)
        assert apps["application"] == []
        assert apps["apps__hashcode"] == ""


async def test_read_only_without_users(
    busreg_worker: Worker, busreg_registry: Registry, tmp_path: Path
) -> None:
    """Without users and without allow_anonymous_writes: reads answer, writes are 403."""
    async with (
        eureka_gateway(busreg_registry.settings, tmp_path / "gw.log", {}) as gw,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        body, ctype = body_of(registration("orders", "o-1", 8081), "json")
        r = await http.post(f"{gw.url}/apps/ORDERS", content=body, headers=ctype)
        assert r.status_code == 403
        assert "read-only" in r.json()["error"]
        assert (await http.get(f"{gw.url}/apps")).status_code == 200
    assert "Eureka API is read-only" in gw.log.read_text()


async def test_auth_enforce(busreg_namespace: Settings, tmp_path: Path) -> None:
    """enforce mode: basic auth required; a user acts for its services only (the owner
    mapping); the gateway signs the events with keys derived from the secret, and the
    enforcing worker accepts them."""
    secret = "s3cret-for-tests"
    owners = {"billing-team": ["billing", "billing-*"]}
    settings = busreg_namespace.model_copy(
        update={"auth": AuthSettings(mode="enforce", secret=secret, owners=owners)}
    )
    env = {
        "BUSREG_AUTH__MODE": "enforce",
        "BUSREG_AUTH__SECRET": secret,
        "BUSREG_AUTH__OWNERS": json.dumps(owners),
    }
    users = {"users": "billing-team:pw1,orders:pw2"}
    async with (
        running_worker(settings),
        Registry(settings) as registry,
        eureka_gateway(settings, tmp_path / "gw.log", users, **env) as gw,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        view = await registry.watch("billing-api")
        body, ctype = body_of(registration("billing-api", "b-1", 8082), "json")
        url = f"{gw.url}/apps/BILLING-API"
        r = await http.post(url, content=body, headers=ctype)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Basic")
        assert (await http.get(f"{gw.url}/apps")).status_code == 401
        r = await http.post(url, content=body, headers=ctype, auth=("billing-team", "wrong"))
        assert r.status_code == 401
        r = await http.post(url, content=body, headers=ctype, auth=("orders", "pw2"))
        assert r.status_code == 403
        assert "may not act" in r.json()["error"]
        r = await http.post(url, content=body, headers=ctype, auth=("billing-team", "pw1"))
        assert r.status_code == 204, r.text
        # signed by the gateway, accepted by the enforcing worker
        await view.wait_for(lambda now: "b-1" in now, timeout=5)
        r = await http.get(f"{gw.url}/apps/BILLING-API/b-1", auth=("orders", "pw2"))
        assert r.status_code == 200
        r = await http.put(
            f"{gw.url}/apps/BILLING-API/b-1/status",
            params={"value": "OUT_OF_SERVICE"},
            auth=("billing-team", "pw1"),
        )
        assert r.status_code == 200, r.text
        await view.wait_for(lambda now: now["b-1"].override is not None, timeout=5)
        override = view.instances["b-1"].override
        assert override is not None
        assert override.by == "eureka:billing-team"
        r = await http.delete(f"{gw.url}/apps/BILLING-API/b-1", auth=("billing-team", "pw1"))
        assert r.status_code == 200
        await view.wait_for(lambda now: "b-1" not in now, timeout=5)
