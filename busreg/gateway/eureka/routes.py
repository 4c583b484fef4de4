"""The Eureka REST v2 server contract, as Starlette routes over the gateway's live views.

    app.router.routes.append(eureka_mount(settings, settings.gateway.eureka))

The routes read ``request.app.state.registry`` (required) and ``request.app.state.catalog``
(optional) that the gateway's lifespan sets. Each write becomes one busreg event through
the registry's ingest publisher, confirmed by the broker before the answer:

* ``POST /apps/{APP}``                    register → ``Register`` (204)
* ``PUT /apps/{APP}/{ID}``                renew → ``Heartbeat`` from the live view (200; 404
  when the view does not know the instance, or the client holds newer data: it registers)
* ``DELETE /apps/{APP}/{ID}``             cancel → ``Deregister`` (200; 404 unknown)
* ``PUT|DELETE /apps/{APP}/{ID}/status``  operator override → ``SetStatus`` (200; 404; 400)
* ``PUT /apps/{APP}/{ID}/metadata?k=v``   → ``Register`` with the merged metadata (200; 404)

Reads answer XML unless ``Accept`` mentions json (Eureka's rule), gzipped when asked.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from busreg.client.registry import Registry
from busreg.errors import BusregError, ConfigurationError
from busreg.gateway.eureka import codec, mapping
from busreg.gateway.eureka.auth import Denied, EurekaAuth
from busreg.gateway.eureka.live import EventClock, LiveRegistry, Seen
from busreg.gateway.eureka.settings import EurekaSettings
from busreg.settings import Settings
from busreg.wire.models import (
    Deregister,
    Heartbeat,
    Instance,
    InstanceStatus,
    Register,
    validation_message,
)

__all__ = ["EurekaApi", "eureka_mount"]

log = logging.getLogger("busreg.gateway.eureka")

Handler = Callable[[Request], Awaitable[Response]]
_ACTIONS: dict[str, mapping.ActionType] = {
    "added": "ADDED",
    "modified": "MODIFIED",
    "removed": "DELETED",
}
_OVERRIDES = ("UP", "DOWN", "OUT_OF_SERVICE")


class EurekaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def eureka_mount(settings: Settings, eureka: EurekaSettings | None = None) -> Mount:
    """The Eureka API as a ``Mount`` at ``eureka.path`` (default ``/eureka``)."""
    eureka = eureka or EurekaSettings()
    return Mount(eureka.path, routes=EurekaApi(settings, eureka).routes())


class EurekaApi:
    def __init__(self, settings: Settings, eureka: EurekaSettings) -> None:
        self.settings = settings
        self.eureka = eureka
        self.auth = EurekaAuth(eureka, settings.auth)
        self.clock = EventClock()
        self.auth.announce()

    def routes(self) -> list[BaseRoute]:
        def route(path: str, handler: Handler, method: str) -> Route:
            return Route(path, self._guarded(handler), methods=[method], include_in_schema=False)

        return [
            route("/apps", self.get_apps, "GET"),
            route("/apps/", self.get_apps, "GET"),
            route("/apps/delta", self.get_delta, "GET"),
            route("/apps/{app}", self.get_app, "GET"),
            route("/apps/{app}", self.register, "POST"),
            route("/apps/{app}/{iid}", self.get_instance, "GET"),
            route("/apps/{app}/{iid}", self.renew, "PUT"),
            route("/apps/{app}/{iid}", self.cancel, "DELETE"),
            route("/apps/{app}/{iid}/status", self.put_status, "PUT"),
            route("/apps/{app}/{iid}/status", self.delete_status, "DELETE"),
            route("/apps/{app}/{iid}/metadata", self.put_metadata, "PUT"),
            route("/instances/{iid}", self.get_instance_by_id, "GET"),
            route("/vips/{vip}", self.get_vip, "GET"),
            route("/svips/{vip}", self.get_svip, "GET"),
        ]

    def _guarded(self, handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Denied as exc:
                headers = (
                    {"www-authenticate": 'Basic realm="eureka", charset="UTF-8"'}
                    if exc.status == 401
                    else None
                )
                return JSONResponse({"error": exc.message}, exc.status, headers=headers)
            except EurekaError as exc:
                return JSONResponse({"error": exc.message}, exc.status)
            except BusregError as exc:
                # the broker or the workers cannot be reached: the client retries elsewhere
                log.warning("%s %s failed: %s", request.method, request.url.path, exc)
                return JSONResponse({"error": f"registry unavailable: {exc}"}, 503)

        return run

    # --- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _live(request: Request) -> LiveRegistry:
        state = request.app.state
        registry: Registry | None = getattr(state, "registry", None)
        if registry is None:
            raise EurekaError(503, "the gateway is starting: no registry yet")
        return LiveRegistry(registry, getattr(state, "catalog", None))

    def _answer(self, request: Request, root: str, doc: dict[str, Any]) -> Response:
        as_json = codec.wants_json(request.headers.get("accept"))
        body = codec.encode(root, doc, as_json=as_json)
        headers = {"vary": "Accept, Accept-Encoding", "cache-control": "no-cache"}
        if "gzip" in request.headers.get("accept-encoding", "").lower():
            body = gzip.compress(body, compresslevel=5)
            headers["content-encoding"] = "gzip"
        media = "application/json" if as_json else "application/xml"
        return Response(body, media_type=media, headers=headers)

    def _applications(
        self, services: dict[str, dict[str, Seen]], keep: Callable[[dict[str, Any]], bool]
    ) -> list[tuple[str, list[dict[str, Any]]]]:
        """``(APP, [instance])`` pairs sorted by name; services whose names differ only in
        case are one Eureka application."""
        apps: dict[str, list[dict[str, Any]]] = {}
        for name in sorted(services):
            for iid in sorted(services[name]):
                seen = services[name][iid]
                info = _eureka(seen)
                if keep(info):
                    apps.setdefault(name.upper(), []).append(info)
        return sorted(apps.items())

    def _find(self, live: LiveRegistry, app: str, iid: str) -> Seen | None:
        for name, instances in live.services().items():
            if name.upper() == app.upper() and iid in instances:
                return instances[iid]
        return None

    async def _body(self, request: Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.eureka.max_body:
                raise EurekaError(413, f"request body over {self.eureka.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _publish(self, live: LiveRegistry, event: Register | Heartbeat | Deregister) -> None:
        publisher = await live.registry._ingest()
        await publisher.publish_until_confirmed(event, self.settings.client.confirm_timeout)

    async def _until(
        self, live: LiveRegistry, service: str, predicate: Callable[[dict[str, Instance]], bool]
    ) -> None:
        """Wait (bounded) until the live view, and the catalog's copy of it, show a write:
        a renewal, a read or a delta right after the answer then finds it. The write
        stands either way (the broker confirmed it)."""
        timeout = self.eureka.visible_timeout
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        view = await live.view(service)
        try:
            await view.wait_for(predicate, timeout)
        except TimeoutError:
            log.debug("%s: a write is not visible after %ss", service, timeout)
            return
        catalog = live.catalog
        if catalog is None:
            return
        # the catalog consumes the same view's changes a moment later; a service it has not
        # adopted yet is served from the view itself (LiveRegistry.pending)
        while (entry := catalog.entries.get(service)) is not None and not predicate(
            entry.instances
        ):
            remaining = deadline - loop.time()
            if remaining <= 0 or not await catalog.wait_mutation(catalog.generation, remaining):
                log.debug("%s: the catalog does not show a write after %ss", service, timeout)
                return

    async def _known(self, request: Request, *, write: bool) -> tuple[LiveRegistry, Instance, str]:
        """The instance a write or instance read names: 404 unless the live view knows it."""
        app, iid = request.path_params["app"], request.path_params["iid"]
        service = mapping.service_of(app)
        who = self.auth.writer(request.headers.get("authorization"), service) if write else ""
        live = self._live(request)
        if write:
            await live.view(service)  # a gateway that just started loads it now
        instance = live.known(service, iid)
        if instance is None:
            raise EurekaError(404, f"no instance {iid} of {app.upper()}")
        return live, instance, who

    # --- reads --------------------------------------------------------------------------------

    async def get_apps(self, request: Request) -> Response:
        self.auth.reader(request.headers.get("authorization"))
        services = self._live(request).services()
        apps = self._applications(services, lambda _: True)
        doc = codec.applications_doc(apps, version=1, hashcode=_hashcode(services))
        return self._answer(request, "applications", doc)

    async def get_delta(self, request: Request) -> Response:
        """Changes of the last ``delta_window`` seconds, one entry per instance (its latest
        change) with ``actionType``; ``apps__hashcode`` is the whole registry's, as Eureka's,
        so a client that applied the delta and counts differently fetches everything."""
        self.auth.reader(request.headers.get("authorization"))
        live = self._live(request)
        services = live.services()
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for change in live.changes_since(time.time() - self.eureka.delta_window):
            latest[(change["service"], change["instance"]["instance_id"])] = change
        apps: dict[str, list[dict[str, Any]]] = {}
        # a service the catalog has not adopted yet has no logged changes so far: its
        # instances are news, as the catalog will log them
        for service in sorted(live.pending()):
            for iid in sorted(services.get(service, {})):
                info = _eureka(services[service][iid])
                apps.setdefault(service.upper(), []).append({**info, "actionType": "ADDED"})
        for (service, _), change in sorted(latest.items()):
            record = change["instance"]
            instance = Instance.model_validate(record)
            info = mapping.to_eureka(
                instance,
                since=record.get("since"),
                changed=record.get("changed"),
                action=_ACTIONS[change["kind"]],
            )
            apps.setdefault(service.upper(), []).append(info)
        doc = codec.applications_doc(
            sorted(apps.items()), version=live.change_seq, hashcode=_hashcode(services)
        )
        return self._answer(request, "applications", doc)

    async def get_app(self, request: Request) -> Response:
        self.auth.reader(request.headers.get("authorization"))
        app = request.path_params["app"].upper()
        services = self._live(request).services()
        found = [a for a in self._applications(services, lambda _: True) if a[0] == app]
        if not found:
            raise EurekaError(404, f"no application {app}")
        name, instances = found[0]
        return self._answer(request, "application", {"name": name, "instance": instances})

    async def get_instance(self, request: Request) -> Response:
        self.auth.reader(request.headers.get("authorization"))
        app, iid = request.path_params["app"], request.path_params["iid"]
        seen = self._find(self._live(request), app, iid)
        if seen is None:
            raise EurekaError(404, f"no instance {iid} of {app.upper()}")
        return self._answer(request, "instance", _eureka(seen))

    async def get_instance_by_id(self, request: Request) -> Response:
        self.auth.reader(request.headers.get("authorization"))
        iid = request.path_params["iid"]
        for instances in self._live(request).services().values():
            if iid in instances:
                return self._answer(request, "instance", _eureka(instances[iid]))
        raise EurekaError(404, f"no instance {iid}")

    async def get_vip(self, request: Request) -> Response:
        return await self._vip(request, "vipAddress")

    async def get_svip(self, request: Request) -> Response:
        return await self._vip(request, "secureVipAddress")

    async def _vip(self, request: Request, field: str) -> Response:
        """Instances whose (comma-separated) VIP list names the VIP; 200 even when none."""
        self.auth.reader(request.headers.get("authorization"))
        vip = request.path_params["vip"].lower()
        services = self._live(request).services()

        def keep(info: dict[str, Any]) -> bool:
            vips = str(info.get(field, "")).lower().split(",")
            return vip in (v.strip() for v in vips)

        apps = self._applications(services, keep)
        doc = codec.applications_doc(apps, version=1, hashcode=_hashcode(services))
        return self._answer(request, "applications", doc)

    # --- writes -------------------------------------------------------------------------------

    async def register(self, request: Request) -> Response:
        app = request.path_params["app"]
        service = mapping.service_of(app)
        who = self.auth.writer(request.headers.get("authorization"), service)
        body = await self._body(request)
        content_type = request.headers.get("content-type", "")
        as_json = "json" in content_type.lower() or body.lstrip()[:1] == b"{"
        try:
            info = mapping.EurekaInstance.model_validate(
                codec.decode_instance(body, as_json=as_json)
            )
        except codec.CodecError as exc:
            raise EurekaError(400, str(exc)) from exc
        except ValidationError as exc:
            raise EurekaError(400, validation_message(exc, "instance")) from exc
        refusal = info.refusal(app)
        if refusal is not None:
            raise EurekaError(400, refusal)
        live = self._live(request)
        await live.view(service)  # opened now: the writer reads its write (see _until)
        known = live.known(service, info.instance_id)
        # A known instance keeps its incarnation (a status change, a retried request, a
        # re-register after a missed renewal): an operator's override stays with it, as
        # Eureka keeps overriddenStatus. A new one gets its incarnation from the client's
        # lastDirtyTimestamp, so the retry of a register whose reply was lost is the same.
        incarnation = (
            known.incarnation if known is not None else mapping.incarnation_of(info, time.time_ns())
        )
        try:
            event = Register(
                incarnation=incarnation,
                seq=self.clock.next(),
                **mapping.register_fields(info, service),
            )
        except ValidationError as exc:
            raise EurekaError(400, validation_message(exc, "instance")) from exc
        await self._publish(live, event)
        expected = event.instance()
        await self._until(
            live, service, lambda now: _same_registration(now.get(event.instance_id), expected)
        )
        log.info(
            "eureka register %s/%s address=%s by=%s", service, event.instance_id, event.address, who
        )
        return Response(status_code=204)

    async def renew(self, request: Request) -> Response:
        live, instance, _ = await self._known(request, write=True)
        given = request.query_params.get("lastDirtyTimestamp")
        stored = instance.metadata.get(mapping.PREFIX + "lastDirtyTimestamp", "0")
        if given is not None and _int(given) > _int(stored):
            # the client holds newer data than the registry (Eureka's validateDirtyTimestamp):
            # 404 makes it register again with that data
            raise EurekaError(404, "the client's lastDirtyTimestamp is newer: register again")
        await self._publish(live, mapping.heartbeat_event(instance, self.clock.next()))
        return Response(status_code=200)

    async def cancel(self, request: Request) -> Response:
        live, instance, who = await self._known(request, write=True)
        await self._publish(live, mapping.deregister_event(instance, self.clock.next()))
        iid = instance.instance_id
        await self._until(live, instance.service, lambda now: iid not in now)
        log.info("eureka cancel %s/%s by=%s", instance.service, iid, who)
        return Response(status_code=200)

    async def put_status(self, request: Request) -> Response:
        value = request.query_params.get("value", "").upper()
        if value not in _OVERRIDES:
            raise EurekaError(400, f"value must be one of {', '.join(_OVERRIDES)}")
        return await self._override(request, InstanceStatus(value))

    async def delete_status(self, request: Request) -> Response:
        return await self._override(request, None)

    async def _override(self, request: Request, status: InstanceStatus | None) -> Response:
        live, instance, who = await self._known(request, write=True)
        try:
            await live.registry.set_status(
                instance.service,
                instance.instance_id,
                status,
                reason="Eureka status override",
                by=f"eureka:{who}"[:128],
            )
        except ConfigurationError as exc:
            raise EurekaError(400, str(exc)) from exc
        iid = instance.instance_id

        def shown(now: dict[str, Instance]) -> bool:
            current = now.get(iid)
            if current is None:
                return True
            if status is None:
                return current.override is None
            return current.override is not None and current.override.status is status

        await self._until(live, instance.service, shown)
        return Response(status_code=200)

    async def put_metadata(self, request: Request) -> Response:
        live, instance, who = await self._known(request, write=True)
        updates = dict(request.query_params)
        reserved = sorted(k for k in updates if k.startswith(mapping.PREFIX))
        if reserved:
            raise EurekaError(400, f"metadata keys starting {mapping.PREFIX!r} are reserved")
        metadata = {**instance.metadata, **updates}
        try:
            event = mapping.updated_event(instance, self.clock.next(), metadata)
        except ValidationError as exc:
            raise EurekaError(400, validation_message(exc, "metadata")) from exc
        await self._publish(live, event)
        iid = instance.instance_id
        await self._until(
            live, instance.service, lambda now: iid in now and now[iid].metadata == metadata
        )
        log.info("eureka metadata %s/%s %s by=%s", instance.service, iid, sorted(updates), who)
        return Response(status_code=200)


def _eureka(seen: Seen) -> dict[str, Any]:
    changed = seen.changed is not None and seen.since is not None and seen.changed > seen.since
    return mapping.to_eureka(
        seen.instance,
        since=seen.since,
        changed=seen.changed,
        action="MODIFIED" if changed else "ADDED",
    )


def _hashcode(services: dict[str, dict[str, Seen]]) -> str:
    return codec.reconcile_hashcode(
        seen.instance.status.value for instances in services.values() for seen in instances.values()
    )


def _same_registration(current: Instance | None, expected: Instance) -> bool:
    if current is None:
        return False
    keys = {"incarnation", "address", "zone", "metadata", "ttl"}
    return current.model_dump(include=keys) == expected.model_dump(include=keys)


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0
