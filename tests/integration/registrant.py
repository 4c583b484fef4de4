"""A registrant process for crash tests: registers, then prints one JSON line with the wall
time of every heartbeat the broker confirmed. Settings come from BUSREG_* variables."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from busreg import Registry, Settings


async def main(service: str, instance_id: str) -> None:
    async with Registry(Settings(), name=f"registrant {instance_id}") as registry:
        reg = await registry.register(service, address="127.0.0.1:9", instance_id=instance_id)
        print(json.dumps({"registered": time.time()}), flush=True)
        seen = 0
        while True:
            # a child process reporting to its parent; the parent does the waiting
            await asyncio.sleep(0.002)
            if reg.heartbeats_sent != seen:
                seen = reg.heartbeats_sent
                print(json.dumps({"heartbeat": time.time(), "n": seen}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
