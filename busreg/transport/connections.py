"""The one place broker and Redis exceptions become busreg errors.

Everything that talks to aio-pika, rstream or redis goes through ``translate`` (or the
``connect_*`` helpers here), so callers only ever see ``busreg.errors`` types.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias, TypeVar

import aio_pika
import aiormq
import hiredis
import redis.asyncio as aioredis
import redis.exceptions as redis_exc
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from busreg.errors import (
    AuthenticationFailed,
    BusregError,
    ConfigurationError,
    ConnectionFailed,
    Fenced,
    PublishFailed,
    TopologyMissing,
)
from busreg.settings import Settings
from busreg.tasks import close_quietly
from busreg.urls import ClusterTarget, StreamEndpoint

__all__ = [
    "RedisClient",
    "connect_amqp",
    "connect_redis",
    "stream_consumer",
    "stream_producer",
    "translate",
    "translate_stream",
]

log = logging.getLogger("busreg.connections")
N = TypeVar("N")
R = TypeVar("R")


def _os_reason(exc: BaseException) -> str:
    """"Connection refused" for an error that carries an errno (aiormq wraps OSError)."""
    code = exc.args[0] if exc.args else None
    if isinstance(code, int):
        return os.strerror(code)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return str(exc)


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@contextmanager
def translate(what: str) -> Iterator[None]:
    """Map a library exception raised inside the block to a BusregError about ``what``."""
    try:
        yield
    except BusregError:
        raise
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except redis_exc.AuthenticationError as exc:
        raise AuthenticationFailed(f"{what}: Redis refused the credentials ({exc})") from exc
    except redis_exc.ReadOnlyError as exc:
        # a master demoted to a replica (a failover): retried like a lost connection
        raise ConnectionFailed(f"{what}: Redis node is a replica now ({exc})") from exc
    except (
        redis_exc.ClusterDownError,
        redis_exc.ClusterError,  # "TTL exhausted": redirections or TRYAGAIN that went on
        redis_exc.TryAgainError,
        redis_exc.MovedError,
        redis_exc.AskError,
        redis_exc.SlotNotCoveredError,
    ) as exc:
        # a Redis Cluster failing over or moving slots: transient, retried like a lost
        # connection (redis-py already followed the redirections it could)
        raise ConnectionFailed(f"{what}: Redis Cluster not ready ({exc!r})") from exc
    except redis_exc.ResponseError as exc:
        if str(exc).startswith("FENCED"):
            raise Fenced(f"{what}: {exc}") from exc
        if "NOPERM" in str(exc) or "NOAUTH" in str(exc):
            raise AuthenticationFailed(f"{what}: {exc}") from exc
        raise BusregError(f"{what}: Redis error {exc}") from exc
    except (redis_exc.ConnectionError, redis_exc.TimeoutError) as exc:
        raise ConnectionFailed(f"{what}: Redis unreachable ({exc})") from exc
    except redis_exc.RedisClusterException as exc:
        # no node of the cluster answered, or its slots are not all served
        raise ConnectionFailed(f"{what}: Redis Cluster unreachable ({exc})") from exc
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise AuthenticationFailed(f"{what}: RabbitMQ refused the credentials") from exc
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise AuthenticationFailed(f"{what}: RabbitMQ access refused ({exc})") from exc
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise TopologyMissing(
            f"{what}: {exc} (run `busreg topology apply` for this namespace)"
        ) from exc
    except aiormq.exceptions.DeliveryError as exc:
        raise PublishFailed(f"{what}: broker did not confirm ({exc})") from exc
    except aiormq.exceptions.InvalidFrameError as exc:
        # aiormq keeps only the repr of the Connection.Close the broker answered the
        # connection's open with; its reason (the vhost) is lost, so say what it means
        if "Connection.Close" in str(exc):
            raise ConfigurationError(
                f"{what}: RabbitMQ refused to open the connection: no such vhost, or the "
                "user may not use it (rabbitmqctl list_vhosts / list_user_permissions)"
            ) from exc
        raise ConnectionFailed(f"{what}: RabbitMQ sent an unexpected frame ({exc})") from exc
    except aiormq.exceptions.AMQPConnectionError as exc:
        raise ConnectionFailed(f"{what}: RabbitMQ unreachable ({_os_reason(exc)})") from exc
    except TimeoutError as exc:  # an OSError too: before the errno branch
        raise ConnectionFailed(f"{what}: timed out") from exc
    except OSError as exc:  # ConnectionRefusedError and friends: their errno says it
        reason = os.strerror(exc.errno) if exc.errno else repr(exc)
        raise ConnectionFailed(f"{what}: RabbitMQ unreachable ({reason})") from exc
    except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
        raise ConnectionFailed(f"{what}: RabbitMQ unreachable or closed ({exc!r})") from exc
    except Exception as exc:
        # rstream raises plain Exception subclasses (ServerError, StreamDoesNotExist, ...)
        module = type(exc).__module__
        if module.startswith("rstream"):
            name = type(exc).__name__
            if name == "StreamDoesNotExist":
                raise TopologyMissing(
                    f"{what}: stream missing (run `busreg topology apply`)"
                ) from exc
            if "Authentication" in name or "SaslAuthentication" in str(exc):
                raise AuthenticationFailed(f"{what}: stream protocol refused us ({exc})") from exc
            raise ConnectionFailed(f"{what}: stream protocol error {name}: {exc}") from exc
        raise


@contextmanager
def translate_stream(what: str) -> Iterator[None]:
    """``translate`` for rstream calls, which on a dead connection also raise bare
    AssertionError/KeyError/AttributeError: at this boundary any failure is a lost stream
    connection (the callers retry or fail over; nothing here is a programming error of ours).
    """
    try:
        with translate(what):
            yield
    except BusregError:
        raise
    except Exception as exc:
        raise ConnectionFailed(f"{what}: stream connection failed ({exc!r})") from exc


async def _on_first_node(
    nodes: Sequence[N], attempt: Callable[[N], Awaitable[R]], *, start: int = 0
) -> R:
    """``attempt(node)`` on each node in turn, beginning at ``start``; the first that
    succeeds wins. Refused credentials end it at once (the same users on every node);
    any other connection failure moves on to the next node, and the last is raised."""
    last: ConnectionFailed | None = None
    for node in [*nodes[start:], *nodes[:start]]:
        try:
            return await attempt(node)
        except AuthenticationFailed:
            raise
        except ConnectionFailed as exc:
            last = exc
            if len(nodes) > 1:
                log.info("node unreachable (%s); trying the next", exc)
    assert last is not None, "no nodes"
    raise last


async def connect_amqp(settings: Settings, name: str) -> AbstractRobustConnection:
    """A robust (self-reconnecting) AMQP connection to the first node of ``amqp_url`` that
    answers; when it is lost, reconnection goes round the nodes (see FailoverConnection)."""
    from busreg.transport.failover import FailoverConnection

    urls = settings.amqp_urls()

    async def attempt(i: int) -> AbstractRobustConnection:
        order = urls[i:] + urls[:i]
        with translate(f"AMQP connect to {_redact(order[0])}"):
            async with asyncio.timeout(10):
                conn = FailoverConnection(order, client_properties={"connection_name": name})
                await conn.connect()
        return conn

    return await _on_first_node(range(len(urls)), attempt)


async def connect_amqp_once(settings: Settings, name: str) -> AbstractConnection:
    """A plain (not self-reconnecting) AMQP connection to the first node that answers; its
    owner opens a new one after a failure (a partition's delta publishing)."""
    urls = settings.amqp_urls()

    async def attempt(url: str) -> AbstractConnection:
        with translate(f"AMQP connect to {_redact(url)}"):
            async with asyncio.timeout(10):
                return await aio_pika.connect(url, client_properties={"connection_name": name})

    return await _on_first_node(urls, attempt, start=next(_round_robin) % len(urls))


#: Where the next connection starts in a list of nodes: spreads a process's connections
#: (a worker's partitions) over the nodes instead of piling them on the first.
_round_robin = itertools.count()


class _HiredisPacking:
    """Commands packed by hiredis (C) rather than redis-py's asyncio packer, which re-joins
    its growing buffer once per argument. A worker's apply call has ~8 arguments per event
    (8,000 per batch): packing a 1,000-event batch took 5.6 ms that way and 0.8 ms with
    hiredis, byte for byte the same (measured on the bench machine; about a fifth of the
    worker's CPU per heartbeat at saturation). redis-py's sync client already does this."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # the same command-name splitting as redis-py ("CONFIG GET" -> two arguments)
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # what redis-py's packer reports as DataError
            raise redis_exc.DataError(str(exc)) from exc


_packing_classes: dict[type[Any], type[Any]] = {}


def _with_hiredis_packing(cls: type[Any]) -> type[Any]:
    """``cls`` (Connection, SSLConnection, UnixDomainSocketConnection, ...) packing with
    hiredis; one subclass per class, made once."""
    if cls not in _packing_classes:
        _packing_classes[cls] = type(f"Hiredis{cls.__name__}", (_HiredisPacking, cls), {})
    return _packing_classes[cls]


#: What every busreg Redis client shares, standalone or behind Sentinels.
_REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 5.0,
    "health_check_interval": 10,
    # busreg retries its Redis calls in one place (busreg.backoff), each where it knows the
    # call is idempotent; redis-py's own retries (on by default since 6.0) would re-run a
    # script whose reply was lost behind busreg's back
    "retry": Retry(NoBackoff(), 0),
    "retry_on_timeout": False,
}

#: A Sentinel that does not answer within this is skipped for the next one: the data
#: path's own timeouts are longer, but asking where the master is must be quick.
SENTINEL_TIMEOUT = 0.5


#: A standalone (or Sentinel-managed) Redis client, or a Redis Cluster one: both run the
#: commands and scripts busreg uses, the cluster one routing each by its key's slot.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster


async def connect_redis(settings: Settings) -> RedisClient:
    """A Redis client; checked with PING so a bad URL fails here, not later.

    With ``redis+sentinel://`` the client asks the Sentinels for the master on every new
    connection, so after a failover it reconnects to the promoted replica by itself (the
    calls in flight fail as ConnectionFailed, and busreg's retries carry on). With
    ``redis+cluster://`` it learns the slot map from the nodes given and follows MOVED/ASK
    itself; a lost node makes it re-read the map on the next call. redis-py's Script
    objects load a script again on NOSCRIPT (SCRIPT LOAD is not replicated)."""
    sentinel_target = settings.redis_sentinel()
    cluster_target = settings.redis_cluster()
    client: RedisClient
    if cluster_target is not None:
        client = _cluster_client(cluster_target)
        where = "cluster " + ",".join(f"{h}:{p}" for h, p in cluster_target.nodes)
    elif sentinel_target is None:
        client = standalone = aioredis.Redis.from_url(settings.redis_url, **_REDIS_OPTIONS)
        where = _redact(settings.redis_url)
        pool = standalone.connection_pool
        pool.connection_class = _with_hiredis_packing(pool.connection_class)
    else:
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
            list(sentinel_target.sentinels),
            sentinel_kwargs={
                "socket_timeout": SENTINEL_TIMEOUT,
                "socket_connect_timeout": SENTINEL_TIMEOUT,
            },
        )
        client = managed = sentinel.master_for(
            sentinel_target.master,
            db=sentinel_target.db,
            username=sentinel_target.username,
            password=sentinel_target.password,
            ssl=sentinel_target.tls,
            **_REDIS_OPTIONS,
        )
        hosts = ",".join(f"{h}:{p}" for h, p in sentinel_target.sentinels)
        where = f"master {sentinel_target.master!r} via Sentinels {hosts}"
        # the class was chosen for the URL's scheme; connections are made on first use
        pool = managed.connection_pool
        pool.connection_class = _with_hiredis_packing(pool.connection_class)
    try:
        with translate(f"Redis connect to {where}"):
            await client.ping()
    except BusregError:
        await client.aclose()
        raise
    return client


def _cluster_client(target: ClusterTarget) -> RedisCluster:
    options = {k: v for k, v in _REDIS_OPTIONS.items() if k != "retry_on_timeout"}
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        ssl=target.tls,
        # with _REDIS_OPTIONS' retry (none): MOVED/ASK are followed inside one call
        # (protocol, not a retry); a lost node raises at once, and busreg's own retry
        # calls again on the re-read slot map
        **options,
    )
    # every node, those found later included, is made with these connection kwargs
    packed = _with_hiredis_packing(client.connection_kwargs["connection_class"])
    client.connection_kwargs["connection_class"] = packed
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = packed
    return client


def _stream_kwargs(endpoint: StreamEndpoint) -> dict[str, Any]:
    return {
        "host": endpoint.host,
        "port": endpoint.port,
        "username": endpoint.username,
        "password": endpoint.password,
        "vhost": endpoint.vhost,
        "ssl_context": endpoint.ssl_context,
    }


async def _first_started(
    settings: Settings, make: Callable[[StreamEndpoint], Any], timeout: float
) -> Any:
    """Start a client made by ``make(endpoint)`` on the first stream listener that answers,
    beginning at the next one in turn (so a dead node is left for the others, and one
    process's connections spread over the nodes), all within ``timeout``. A try gets its
    share of it: rstream's start does not fail on a connection that a dead node's host
    resets, it waits (measured: the whole timeout), so one try may not take it all."""
    endpoints = settings.stream_endpoints()
    timeout = max(0.5, timeout / len(endpoints))

    async def attempt(endpoint: StreamEndpoint) -> Any:
        client = make(endpoint)
        try:
            with translate_stream(f"stream connect to {endpoint.host}:{endpoint.port}"):
                async with asyncio.timeout(timeout):
                    await client.start()
        except BaseException:
            await close_quietly(client.close, "stream client", timeout=2)
            raise
        return client

    return await _on_first_node(endpoints, attempt, start=next(_round_robin) % len(endpoints))


async def stream_producer(
    settings: Settings,
    name: str,
    timeout: float = 10.0,
    on_close: Callable[[Any], Awaitable[None]] | None = None,
) -> Any:
    """A started rstream Producer (stream protocol, port 5552 by default).

    rstream's own reconnection is off: busreg.transport.streams.StreamWriter replaces a failed
    producer itself, promptly, on the next node in turn (see there): rstream reconnects
    only to the node it was created with, and a Producer made with a dead node's address
    never resumes (measured in ../shared/platform-notes.md §1)."""
    from rstream.recovery import BackOffRecoveryStrategy

    from busreg.transport.producer import QuickProducer

    return await _first_started(
        settings,
        lambda endpoint: QuickProducer(
            connection_name=name,
            recovery_strategy=BackOffRecoveryStrategy(False),
            on_close_handler=on_close,
            load_balancer_mode=settings.stream_load_balancer,
            **_stream_kwargs(endpoint),
        ),
        timeout,
    )


async def stream_consumer(
    settings: Settings, name: str, on_close: Callable[[Any], Awaitable[None]] | None = None
) -> Any:
    """A started rstream Consumer; ``on_close`` hears of every lost connection."""
    from rstream import Consumer

    return await _first_started(
        settings,
        lambda endpoint: Consumer(
            connection_name=name,
            on_close_handler=on_close,
            load_balancer_mode=settings.stream_load_balancer,
            **_stream_kwargs(endpoint),
        ),
        10.0,
    )
