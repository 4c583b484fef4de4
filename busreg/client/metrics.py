"""Prometheus metrics of one Registry client, for the host application's own registry::

    from prometheus_client import REGISTRY
    from busreg.client.metrics import RegistryCollector

    REGISTRY.register(RegistryCollector(registry))

Reads the registry's in-memory counters at scrape time (safe from an exposition thread: it
only copies lists and reads numbers). See docs/metrics.md for every metric.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from busreg.client.registry import Registry

__all__ = ["RegistryCollector"]


class RegistryCollector(Collector):
    """Metrics of one Registry client, for the host application's own registry::

        REGISTRY.register(RegistryCollector(registry))

    Reads the registry's in-memory counters at scrape time (safe from an exposition
    thread: it only copies lists and reads numbers)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        regs = list(self._registry.registrations)
        views = list(self._registry.views.items())
        active = GaugeMetricFamily(
            "busreg_client_registrations",
            "Instances this client registered that are still heartbeating.",
            labels=["service"],
        )
        sent = CounterMetricFamily(
            "busreg_client_heartbeats_sent",
            "Heartbeats the broker confirmed, over every registration of this client.",
            labels=["service"],
        )
        failed = CounterMetricFamily(
            "busreg_client_heartbeats_failed",
            "Heartbeats that were not confirmed in time (the next one is tried on schedule).",
            labels=["service"],
        )
        per_service: dict[str, list[int]] = {}
        for reg in regs:
            row = per_service.setdefault(reg.service, [0, 0, 0])
            row[0] += 1 if reg.active else 0
            row[1] += reg.heartbeats_sent
            row[2] += reg.heartbeats_failed
        for service, (n_active, n_sent, n_failed) in sorted(per_service.items()):
            active.add_metric([service], n_active)
            sent.add_metric([service], n_sent)
            failed.add_metric([service], n_failed)
        yield active
        yield sent
        yield failed
        yield GaugeMetricFamily(
            "busreg_client_watched_services",
            "Services this client keeps a live view of.",
            value=len(views),
        )
        revision = GaugeMetricFamily(
            "busreg_client_view_revision",
            "Revision of the service the live view is at.",
            labels=["service"],
        )
        instances = GaugeMetricFamily(
            "busreg_client_view_instances",
            "Instances in the live view (any status).",
            labels=["service"],
        )
        resyncs = CounterMetricFamily(
            "busreg_client_view_resyncs",
            "Snapshot reads of the view (start, gaps, reconnects, periodic checks).",
            labels=["service"],
        )
        deltas = CounterMetricFamily(
            "busreg_client_view_deltas_applied",
            "Deltas applied to the view in order.",
            labels=["service"],
        )
        for service, view in sorted(views):
            revision.add_metric([service], view.revision)
            instances.add_metric([service], len(view.state.instances))
            resyncs.add_metric([service], view.resyncs)
            deltas.add_metric([service], view.deltas_applied)
        yield revision
        yield instances
        yield resyncs
        yield deltas
