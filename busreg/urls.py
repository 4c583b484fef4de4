"""Where the servers are, parsed from the URLs of ``busreg.settings.Settings``: Redis behind
Sentinels or in a Cluster, and the RabbitMQ stream endpoints. Pure; no I/O."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["ClusterTarget", "SentinelTarget", "StreamEndpoint"]


@dataclass(frozen=True)
class SentinelTarget:
    """Where Redis is when ``redis_url`` names Sentinels, parsed from
    ``redis+sentinel://[user:password@]host1:26379,host2:26379/<master name>/<db>``
    (``rediss+sentinel://`` for TLS to the data nodes). The credentials are the data
    nodes'; the Sentinels are asked without.

    >>> SentinelTarget.parse("redis+sentinel://a:26379,b:26380/mymaster/2").sentinels
    (('a', 26379), ('b', 26380))
    """

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        scheme, username, password, sentinels, path = _split_multi_host(
            url, "sentinel", "redis+sentinel://[user:pw@]h1:26379,h2:26379/master/0"
        )
        master, _, db = path.strip("/").partition("/")
        if not master:
            raise ValueError("name the Sentinel master: redis+sentinel://h1:26379/<master>/0")
        if db and not db.isdigit():
            raise ValueError(f"database {db!r} must be a number")
        return cls(
            sentinels=sentinels,
            master=unquote(master),
            db=int(db or 0),
            username=username,
            password=password,
            tls=scheme.startswith("rediss"),
        )


@dataclass(frozen=True)
class ClusterTarget:
    """Where Redis is when ``redis_url`` names a Redis Cluster, parsed from
    ``redis+cluster://[user:password@]host1:7001,host2:7002`` (``rediss+cluster://`` for
    TLS). The nodes are where the client starts: it learns the others, and which master
    serves which slot, from them. A cluster has database 0 only.

    >>> ClusterTarget.parse("redis+cluster://a:7001,b:7002").nodes
    (('a', 7001), ('b', 7002))
    """

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> ClusterTarget:
        scheme, username, password, nodes, path = _split_multi_host(
            url, "cluster", "redis+cluster://[user:pw@]h1:7001,h2:7002"
        )
        if path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has database 0 only: leave the path out")
        return cls(
            nodes=nodes, username=username, password=password, tls=scheme.startswith("rediss")
        )


def _split_multi_host(
    url: str, kind: str, shape: str
) -> tuple[str, str | None, str | None, tuple[tuple[str, int], ...], str]:
    """(scheme, user, password, ((host, port), ...), path) of a ``redis+<kind>://`` URL."""
    scheme, _, rest = url.partition("://")
    if scheme not in (f"redis+{kind}", f"rediss+{kind}") or not rest:
        raise ValueError(f"must look like {shape}")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    addresses = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{kind} address {item!r} must be host:port")
        addresses.append((host.strip("[]"), int(port)))
    return scheme, unquote(username) or None, unquote(password) or None, tuple(addresses), path


@dataclass(frozen=True)
class StreamEndpoint:
    """Where and how to reach the RabbitMQ stream protocol listener."""

    host: str
    port: int
    username: str
    password: str
    vhost: str
    ssl_context: ssl.SSLContext | None
