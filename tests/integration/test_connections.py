"""What a Registry connects to, by role: a registrant that never reads opens no AMQP
connection (a broker's file descriptors are what ~1,000 independent clients exhausted),
and still refuses a namespace whose partition count disagrees with its settings."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from busreg import Registry, Settings
from busreg.errors import PartitionMismatch, TopologyMissing

from .helpers import eventually, spawn_worker, stop_process

pytestmark = [pytest.mark.servers, pytest.mark.busreg(partitions=2)]


async def _established_to(port: int) -> int:
    """This process's established TCP connections to ``port`` (IPv4 and IPv6): the
    namespace's socket tables, filtered by the socket inodes among our descriptors."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                ours.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:  # noqa: ASYNC230 - a procfs read, no I/O wait
            for line in f.readlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in ours:
                    count += 1
    return count


async def test_a_registrant_opens_no_amqp_connection_until_it_reads(
    busreg_namespace: Settings, tmp_path: Path
) -> None:
    settings = busreg_namespace
    amqp_port = int(settings.amqp_urls()[0].rsplit(":", 1)[1].split("/")[0])
    # the worker in its own process, so that its connections are not ours
    worker = spawn_worker(settings, "lazy-w", tmp_path / "worker.log")
    try:
        before = await _established_to(amqp_port)
        async with Registry(settings) as registry:
            await registry.register("lazy", address="127.0.0.1:1", instance_id="l-1")
            assert registry._amqp is None
            assert await _established_to(amqp_port) == before
            # a read: now it connects (the worker answers once it owns the partitions)
            await eventually(registry.services, bool, timeout=20, what="a services answer")
            assert registry._amqp is not None
            assert await _established_to(amqp_port) == before + 1
        assert await _established_to(amqp_port) == before
    finally:
        stop_process(worker)


async def test_a_registrant_still_checks_the_partition_count(busreg_namespace: Settings) -> None:
    wrong = busreg_namespace.model_copy(update={"partitions": 3})
    async with Registry(wrong) as registry:
        with pytest.raises(PartitionMismatch, match="has 2 ingest partitions but settings say 3"):
            await registry.register("lazy", address="127.0.0.1:1")
    missing = busreg_namespace.model_copy(update={"namespace": "no-such-namespace-x"})
    async with Registry(missing) as registry:
        with pytest.raises(TopologyMissing, match="topology apply"):
            await registry.register("lazy", address="127.0.0.1:1")
