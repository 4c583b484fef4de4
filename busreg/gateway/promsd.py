"""Prometheus ``http_sd_config``: ``GET /prometheus/sd[?service=NAME]``.

The format Prometheus reads (docs: prometheus.io, http_sd_config): HTTP 200,
``Content-Type: application/json``, a JSON list of ``{"targets": ["host:port"], "labels":
{...}}``; the full list on every request (an empty list is valid: no targets).

One group per instance, so the labels can differ per instance (zone, status, metadata);
groups sorted by (service, instance_id) so the answer is stable while nothing changes.
Labels: ``__meta_busreg_service``, ``__meta_busreg_zone``, ``__meta_busreg_status``,
``__meta_busreg_instance_id``, ``__meta_busreg_address``, ``__meta_busreg_incarnation``
and ``__meta_busreg_metadata_<key>`` (key sanitised to a label name). ``__meta_`` labels
are dropped after relabelling, so the scrape config chooses which to keep.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from busreg.gateway.api import NoQuery, catalog_of, query
from busreg.gateway.catalog import Entry
from busreg.wire.models import Instance, ServiceName

__all__ = ["SdQuery", "http_sd", "label_name", "sd_groups", "target_group"]

PREFIX = "__meta_busreg_"
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


class SdQuery(NoQuery):
    service: ServiceName | None = Field(None, description="only this service's instances")


def label_name(key: str) -> str:
    """A metadata key as a Prometheus label name suffix: every character outside
    ``[a-zA-Z0-9_]`` becomes ``_`` (label names are ``[a-zA-Z_][a-zA-Z0-9_]*``; the prefix
    makes a leading digit fine).

    >>> label_name("git.sha-1")
    'git_sha_1'
    """
    return _INVALID.sub("_", key)


def target_group(instance: Instance) -> dict[str, Any]:
    labels = {
        PREFIX + "service": instance.service,
        PREFIX + "instance_id": instance.instance_id,
        PREFIX + "zone": instance.zone,
        PREFIX + "status": instance.status.value,
        PREFIX + "address": instance.address,
        PREFIX + "incarnation": str(instance.incarnation),
    }
    # two keys may sanitise to one name ("a.b", "a_b"): the first in key order wins, so
    # the answer does not depend on dict order
    for key in sorted(instance.metadata, reverse=True):
        labels[PREFIX + "metadata_" + label_name(key)] = instance.metadata[key]
    return {"targets": [instance.address], "labels": labels}


def sd_groups(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    return [
        target_group(entry.instances[iid])
        for entry in sorted(entries, key=lambda e: e.service)
        for iid in sorted(entry.instances)
    ]


async def http_sd(request: Request) -> Response:
    """Every instance (or one service's) as Prometheus http_sd target groups."""
    q = query(request, SdQuery)
    catalog = catalog_of(request)
    if q.service is None:
        entries: list[Entry] = list(catalog.entries.values())
    else:
        # an unknown service has no targets: an empty list, as Prometheus expects
        entry = catalog.entries.get(q.service)
        entries = [] if entry is None else [entry]
    return JSONResponse(sd_groups(entries))
