"""``GroupMessage.retry()`` gives a delta back with ``basic.reject(requeue=True)``.

From RabbitMQ 4.3 a ``basic.nack`` with requeue no longer counts towards a quorum queue's
delivery limit, so a poison delta given back that way would be redelivered for ever; a
reject still counts (issue 11, item 10). The broker side is in
``tests/integration/test_group_retry.py``.
"""

from __future__ import annotations

from typing import Any

import orjson

from busreg.client.groups import GroupMessage

DELTA = {
    "v": 1,
    "kind": "added",
    "service": "svc",
    "epoch": "e1",
    "revision": 1,
    "instance": {
        "service": "svc",
        "instance_id": "i1",
        "address": "127.0.0.1:8080",
        "incarnation": 1,
        "version": 1,
    },
}


class _Message:
    def __init__(self) -> None:
        self.body = orjson.dumps(DELTA)
        self.redelivered = False
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def reject(self, **kwargs: Any) -> None:
        self.calls.append(("reject", kwargs))

    async def nack(self, **kwargs: Any) -> None:
        self.calls.append(("nack", kwargs))

    async def ack(self, **kwargs: Any) -> None:
        self.calls.append(("ack", kwargs))


async def test_retry_rejects_with_requeue_never_nacks() -> None:
    raw = _Message()
    message = GroupMessage(raw)  # type: ignore[arg-type]
    await message.retry()
    assert raw.calls == [("reject", {"requeue": True})]
