"""A worker runs with a Redis ACL user that may touch busreg's keys only."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from busreg import Registry, Settings
from busreg.testing import running_worker

pytestmark = pytest.mark.servers


@pytest.fixture
def acl_user(busreg_namespace: Settings) -> Iterator[str]:
    """A Redis user limited to the ``busreg:`` key prefix, scripts and what the worker uses."""
    admin = redis.Redis.from_url(busreg_namespace.redis_url)
    name = f"busreg-{uuid.uuid4().hex[:6]}"
    admin.execute_command(
        "ACL",
        "SETUSER",
        name,
        "on",
        ">acl-pw",
        "resetkeys",
        "~busreg:*",
        "-@all",
        "+@read",
        "+@write",
        "+@scripting",
        "+@connection",
        "+time",
        "+info",
    )
    try:
        yield name
    finally:
        admin.execute_command("ACL", "DELUSER", name)
        admin.close()


async def test_worker_with_a_restricted_redis_acl_user(
    busreg_namespace: Settings, acl_user: str
) -> None:
    url = busreg_namespace.redis_url.replace("redis://", f"redis://{acl_user}:acl-pw@")
    settings = busreg_namespace.model_copy(update={"redis_url": url})
    async with running_worker(settings), Registry(settings) as client:
        view = await client.watch("acl-svc", resync_interval=None)
        await client.register("acl-svc", address="127.0.0.1:1", instance_id="a")
        await view.wait_for(lambda i: "a" in i, timeout=10)
    # and the user really is restricted: a key outside the prefix is refused
    restricted = redis.Redis.from_url(url)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            restricted.set("not-busreg", "x")
    finally:
        restricted.close()
