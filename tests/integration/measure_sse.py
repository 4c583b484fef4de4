"""How many SSE clients one gateway holds (docs/gateway.md, "Measured"): N dashboard
streams (raw sockets) on a `busreg gateway` process, its RSS and idle CPU, then the time from
one change (``update()``) until every stream received it.

    python -m tests.integration.measure_sse 900     # local RabbitMQ and Redis, BUSREG_* env
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid

from busreg import Registry, Settings
from busreg.ops.admin import delete_namespace

PORT = 18555


def rss_and_cpu(pid: int) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds so far) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Streams:
    """N dashboard streams; ``all_saw`` is set when every one has seen ``want`` changes."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ready = 0
        self.opened = asyncio.Event()
        self.seen: list[int] = [0] * n
        self.want = 0
        self.all_saw = asyncio.Event()

    async def read(self, k: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", PORT)
        w.write(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        await w.drain()
        while line := await r.readline():
            if line.startswith(b"event: state"):
                self.ready += 1
                if self.ready == self.n:
                    self.opened.set()
            elif line.startswith(b"data: ") and b'"kind":"modified"' in line:
                self.seen[k] += 1
                if self.seen[k] == self.want and min(self.seen) >= self.want:
                    self.all_saw.set()


async def main(n: int) -> None:
    ns = f"sse{uuid.uuid4().hex[:6]}"
    env = dict(
        os.environ,
        BUSREG_NAMESPACE=ns,
        BUSREG_PARTITIONS="4",
        BUSREG_GATEWAY__MAX_STREAMS=str(n + 50),
        BUSREG_GATEWAY__MAX_CONNECTIONS=str(n + 200),
    )
    busreg = [sys.executable, "-m", "busreg", "--log-level", "WARNING"]
    await asyncio.to_thread(subprocess.run, [*busreg, "topology", "apply"], env=env, check=True)
    worker = await asyncio.to_thread(subprocess.Popen, [*busreg, "worker"], env=env)
    gateway = await asyncio.to_thread(
        subprocess.Popen, [*busreg, "gateway", "--port", str(PORT)], env=env
    )
    settings = Settings(namespace=ns, partitions=4)
    try:
        async with Registry(settings) as registry:
            regs = [
                await registry.register(
                    f"svc-{i % 10}", address=f"10.0.0.{i}:80", instance_id=f"i-{i}"
                )
                for i in range(50)
            ]
            await asyncio.sleep(4)  # the gateway's first listings: a measurement pause
            base_rss, _ = rss_and_cpu(gateway.pid)
            streams = Streams(n)
            tasks = [asyncio.create_task(streams.read(k)) for k in range(n)]
            started = time.monotonic()
            await asyncio.wait_for(streams.opened.wait(), 120)
            opened = time.monotonic() - started
            rss, cpu = rss_and_cpu(gateway.pid)
            print(f"{n} streams open in {opened:.1f}s; gateway RSS {base_rss:.1f} -> {rss:.1f} MiB")
            await asyncio.sleep(5)  # an idle window to measure CPU over
            _, cpu_idle = rss_and_cpu(gateway.pid)
            print(f"idle with {n} streams: CPU {(cpu_idle - cpu) / 5 * 100:.1f}% of a core")
            fan_out = []
            for k in range(10):
                streams.want += 1
                streams.all_saw.clear()
                t = time.monotonic()
                await regs[k].update(metadata={"v": str(k)})
                await asyncio.wait_for(streams.all_saw.wait(), 10)
                fan_out.append((time.monotonic() - t) * 1000)
            rss, _ = rss_and_cpu(gateway.pid)
            print(
                f"one change to all {n} streams (update() -> the last stream), ms: "
                f"p50 {statistics.median(fan_out):.0f}, max {max(fan_out):.0f}; RSS {rss:.1f} MiB"
            )
            for task in tasks:
                task.cancel()
    finally:
        for proc in (gateway, worker):
            proc.terminate()
            await asyncio.to_thread(proc.wait, 10)
        await delete_namespace(settings)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 900))
