"""Typed settings, read from ``BUSREG_*`` environment variables and passed explicitly.

    settings = Settings()                                   # environment
    settings = Settings(amqp_url="amqp://app:secret@mq:5672/prod", namespace="prod")

Nested groups use ``__``: ``BUSREG_WORKER__TICK_INTERVAL=0.05``.
"""

from __future__ import annotations

import ssl
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from busreg import constants as c
from busreg.errors import ConfigurationError
from busreg.urls import ClusterTarget, SentinelTarget, StreamEndpoint

__all__ = [
    "AuthSettings",
    "ClientSettings",
    "EurekaSettings",
    "GatewayAuthSettings",
    "GatewaySettings",
    "Settings",
    "StreamEndpoint",
    "WorkerSettings",
]

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$"


def _urls(value: str) -> list[str]:
    """The URLs of a comma-separated list (one URL is a list of one)."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError("give at least one URL")
    return urls


def _check_urls(value: str, schemes: tuple[str, ...], example: str) -> None:
    """Every URL of the comma-separated ``value`` has one of ``schemes`` and a host."""
    for url in _urls(value):
        parts = _split(url)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must look like {example} (several: comma-separated)")


def _split(url: str) -> SplitResult:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ValueError(f"bad port in {parts.scheme}:// URL") from exc
    return parts


class WorkerSettings(BaseModel):
    """Shard worker tuning; the defaults meet the targets in docs/benchmarks.md."""

    tick_interval: float = Field(c.DEFAULT_TICK_INTERVAL, gt=0, le=5)
    standby_tick_interval: float = Field(c.DEFAULT_STANDBY_TICK_INTERVAL, gt=0, le=30)
    max_clock_step: float = Field(c.DEFAULT_MAX_CLOCK_STEP, gt=0, le=60)
    outage_grace: float = Field(c.DEFAULT_OUTAGE_GRACE, ge=0, le=600)
    replay_window: float = Field(c.DEFAULT_REPLAY_WINDOW, gt=0)
    tombstone_ttl: float = Field(c.DEFAULT_TOMBSTONE_TTL, gt=0)
    lease_ttl: float = Field(c.DEFAULT_LEASE_TTL, ge=0.3, le=60)
    batch_max: int = Field(1000, ge=1, le=10_000)
    buffer_max: int = Field(20_000, ge=100)
    outbox_batch: int = Field(500, ge=1, le=10_000)
    drain_timeout: float = Field(5.0, gt=0)
    worker_id: str | None = None
    #: Serve Prometheus metrics on this TCP port (``GET /metrics``; 0 picks a free port);
    #: None (the default) serves none. See docs/metrics.md.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    #: Address the metrics port binds ("0.0.0.0": every interface, for a scraper elsewhere).
    metrics_host: str = "0.0.0.0"

    @model_validator(mode="after")
    def _timings_agree(self) -> WorkerSettings:
        # A quiet partition's clock moves by its ticks: ticks further apart than the
        # largest clock step would look like an ingest outage each time, open the outage
        # grace again and again, and hold every expiry back.
        for name in ("tick_interval", "standby_tick_interval"):
            if getattr(self, name) >= self.max_clock_step:
                raise ValueError(
                    f"{name} ({getattr(self, name)}s) must be below max_clock_step "
                    f"({self.max_clock_step}s): ticks further apart read as ingest outages"
                )
        return self


class AuthSettings(BaseModel):
    """Who may write events for which service (see busreg.wire.auth).

    ``mode="off"`` (the development default; workers log it loudly) accepts everything.
    ``mode="enforce"`` dead-letters, as ``unauthorised``, any event that is neither signed
    with its service's key nor (with ``accept_unsigned_amqp``) published over AMQP by an
    identity the owner mapping allows.
    """

    mode: Literal["off", "enforce"] = "off"
    #: Workers' secret; service keys derive from it. Never give it to registrants.
    secret: SecretStr | None = None
    #: broker user -> service patterns it may act for (default: the same-named service)
    owners: dict[str, list[str]] = Field(default_factory=dict)
    #: Trust the broker-validated user_id alone. Safe only when no untrusted principal may
    #: write to the ingest streams directly (stream protocol), which could forge it.
    accept_unsigned_amqp: bool = False

    def secret_bytes(self) -> bytes | None:
        return None if self.secret is None else self.secret.get_secret_value().encode()


class ClientSettings(BaseModel):
    """Registrant and watcher defaults."""

    heartbeat_interval: float = Field(c.DEFAULT_HEARTBEAT_INTERVAL, gt=0, le=30)
    ttl: float = Field(c.DEFAULT_TTL, gt=0, le=c.MAX_TTL)
    confirm_timeout: float = Field(c.DEFAULT_CONFIRM_TIMEOUT, gt=0)
    request_timeout: float = Field(3.0, gt=0)
    watch_queue_max: int = Field(10_000, ge=10)
    #: Hex service key(s) this registrant signs with: "service=hexkey,other=hexkey", or one
    #: bare hex key used for every service (``busreg keys SERVICE`` prints them).
    signing_keys: SecretStr | None = None
    #: How registrations travel: "stream" (rstream, fast; the broker user needs write on
    #: the ingest streams) or "amqp" (the super stream exchange, with the broker-validated
    #: user_id as identity: for least-privilege per-service users).
    ingest_protocol: Literal["stream", "amqp"] = "stream"
    #: Heartbeats of this process's registrations that fall due together go out as one
    #: event per partition (contract v2, ``Heartbeats``) instead of one each. Workers older
    #: than v2 dead-letter such batches: upgrade the workers first, or turn this off.
    batch_heartbeats: bool = True

    def keys(self) -> dict[str, bytes]:
        """Service -> key; the ``"*"`` entry is a key used for any service."""
        if self.signing_keys is None:
            return {}
        out: dict[str, bytes] = {}
        for item in self.signing_keys.get_secret_value().split(","):
            service, sep, key = item.strip().rpartition("=")
            try:
                out[service if sep else "*"] = bytes.fromhex(key)
            except ValueError as exc:
                raise ValueError("client.signing_keys: keys must be hex") from exc
        return out


class GatewayAuthSettings(BaseModel):
    """Who may read the gateway (``busreg gateway``): nobody is asked when both are unset.

    ``token`` is a bearer token (``Authorization: Bearer <token>``, or Consul's
    ``X-Consul-Token`` header, which Prometheus' consul_sd_config sends); ``users`` is a
    comma-separated ``user:password`` list for HTTP basic auth (what a browser prompts for).
    """

    token: SecretStr | None = None
    users: SecretStr | None = None

    @field_validator("users")
    @classmethod
    def _check_users(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _user_pairs(value.get_secret_value())
        return value

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.users is not None

    def user_map(self) -> dict[str, str]:
        """user -> password of ``users``."""
        return {} if self.users is None else _user_pairs(self.users.get_secret_value())


def _user_pairs(value: str, name: str = "gateway.auth.users") -> dict[str, str]:
    users: dict[str, str] = {}
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            # the message must not echo the item: it holds a password
            raise ValueError(f"{name} must be user:password[,user:password...]")
        users[user] = password
    return users


class EurekaSettings(BaseModel):
    """The Eureka-compatible API of ``busreg gateway`` (docs/eureka.md).

    ``users`` (``user:password,...``) are HTTP basic-auth users, Spring Cloud's usual
    ``http://user:pass@host/eureka/``; each may act for the services ``auth.owners`` maps it
    to (the broker users' mapping), else for the service of its own name. With users, every
    Eureka request must authenticate; without, reads are open and writes refused unless
    ``allow_anonymous_writes`` (development only; never in ``auth.mode=enforce``).
    """

    #: Serve the Eureka API at all.
    enabled: bool = True
    #: Where it is mounted (Spring's ``defaultZone`` is ``http://host:port<path>/``).
    path: str = Field("/eureka", pattern=r"^(/[A-Za-z0-9._-]+)+$")
    users: SecretStr | None = None
    allow_anonymous_writes: bool = False
    #: Seconds of changes ``/apps/delta`` returns (Eureka's retentionTimeInMSInDeltaQueue).
    delta_window: float = Field(180.0, gt=0, le=3600)
    #: Seconds a write waits for the live view to show it before answering (read your
    #: writes: a renewal right after a register finds it); the write stands either way.
    visible_timeout: float = Field(2.0, ge=0, le=30)
    #: Largest request body accepted (bytes).
    max_body: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)

    @field_validator("users")
    @classmethod
    def _check_users(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _user_pairs(value.get_secret_value(), "gateway.eureka.users")
        return value

    def user_map(self) -> dict[str, str]:
        if self.users is None:
            return {}
        return _user_pairs(self.users.get_secret_value(), "gateway.eureka.users")


class RoutingSettings(BaseModel):
    """The gateway's edge proxy (``busreg gateway --route``; docs/gateway-proxy.md describes
    each field). Service names and the retry policy are checked where they are used
    (``busreg.gateway.proxy.RouteSettings``, which adds those checks to these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Services whose views are loaded at start (Zuul's eager loading); others on first use.
    services: list[str] = Field(default_factory=list)
    only_listed: bool = False  # route to the listed services only
    host_routing: bool = False  # Host: <service><host_suffix> routes the whole path
    host_suffix: str = Field("", max_length=200, pattern=r"^(\.[A-Za-z0-9_.-]+)?$")
    zone: str | None = None  # prefer instances in this zone (ZoneAware)
    connect_timeout: float = Field(1.0, gt=0, le=60)
    read_timeout: float = Field(30.0, gt=0, le=3600)  # per read, not per body
    max_auto_retries: int = Field(0, ge=0, le=5)
    max_auto_retries_next_server: int = Field(1, ge=0, le=5)
    retry_with_idempotency_key: bool = True  # retry a POST/PATCH that carries one
    deadline: float | None = Field(None, gt=0)  # to the response headers; None: worst case
    retry_budget_ratio: float = Field(0.2, ge=0, le=10)
    retry_budget_min_per_second: float = Field(10.0, ge=0)
    replay_buffer: int = Field(64 * 1024, ge=0, le=16 * 1024 * 1024)
    max_connections: int = Field(512, ge=1)  # to instances, all services
    max_keepalive_connections: int = Field(64, ge=0)
    keepalive_expiry: float = Field(5.0, ge=0)
    max_services: int = Field(256, ge=1)  # views held at most
    unknown_service_ttl: float = Field(1.0, ge=0)  # a 404 for a name is cached this long
    trust_forwarded: bool = False  # keep the client's X-Forwarded-* (behind another proxy)


class GatewaySettings(BaseModel):
    """``busreg gateway``: the HTTP API, dashboard and discovery endpoints (docs/gateway.md)."""

    #: Address to bind; the loopback by default: the API has no auth unless configured.
    host: str = "127.0.0.1"
    port: int = Field(8500, ge=0, le=65535)
    #: Seconds between reads of the service list (new services are watched from then on).
    refresh: float = Field(2.0, gt=0, le=300)
    #: Recent changes kept in memory (the dashboard's log, SSE resume, /api/v1/changes).
    changes_kept: int = Field(500, ge=10, le=100_000)
    #: Mount the edge proxy under /route (busreg.gateway.proxy), configured by ``routing``.
    route: bool = False
    routing: RoutingSettings = RoutingSettings()
    #: Operator pages (workers, partitions, dead letters) read Redis like ``busreg status``.
    operator: bool = False
    #: Seconds between operator samples (the history keeps the last 10 minutes).
    operator_interval: float = Field(5.0, ge=0.5, le=300)
    #: Open SSE streams at most; one more gets 503.
    max_streams: int = Field(1000, ge=1, le=100_000)
    #: Events queued per SSE stream; a client that falls this far behind is disconnected.
    stream_buffer: int = Field(1000, ge=10, le=1_000_000)
    #: Open connections at most (uvicorn limit_concurrency: more get 503).
    max_connections: int = Field(2000, ge=10, le=1_000_000)
    #: Bytes of request line + headers at most (uvicorn h11_max_incomplete_event_size).
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    auth: GatewayAuthSettings = GatewayAuthSettings()
    #: The Eureka-compatible API (its own basic-auth users; ``auth`` does not apply there).
    eureka: EurekaSettings = EurekaSettings()

    @model_validator(mode="after")
    def _streams_fit(self) -> GatewaySettings:
        if self.max_streams >= self.max_connections:
            raise ValueError(
                "gateway.max_streams must be below gateway.max_connections: SSE streams "
                "must leave connections for the API"
            )
        return self


class Settings(BaseSettings):
    """Everything a worker, a client or the CLI needs to know."""

    # errors never echo what was given: values include URLs with passwords and secrets
    model_config = SettingsConfigDict(
        env_prefix="BUSREG_", env_nested_delimiter="__", extra="ignore", hide_input_in_errors=True
    )

    #: One URL, or several separated by commas (the nodes of a cluster): connections go
    #: to the first that answers and fail over to the next on loss.
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: Stream protocol URL(s), comma-separated like amqp_url; by default each AMQP URL's
    #: host, user and vhost on port 5552.
    stream_url: str | None = None
    #: The stream listeners are behind a load balancer: rstream then connects through it
    #: and checks it reached the node it wanted (the stream leader or a replica).
    stream_load_balancer: bool = False
    #: Replicas of each ingest stream when the topology is created (None: one per AMQP URL
    #: given, at most 3). More than one also spreads the stream leaders over the nodes
    #: (``x-queue-leader-locator: balanced``). Streams that exist keep theirs.
    stream_replicas: int | None = Field(None, ge=1, le=9)
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field("busreg", pattern=_NAME_PATTERN)
    partitions: int = Field(8, ge=1, le=256)
    #: Segment and retention of the ingest partitions (bytes). Small segments make
    #: retention bite on quiet partitions too (it is only enforced when a segment rolls).
    stream_max_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024)
    stream_segment_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    worker: WorkerSettings = WorkerSettings()
    client: ClientSettings = ClientSettings()
    auth: AuthSettings = AuthSettings()
    gateway: GatewaySettings = GatewaySettings()

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp(cls, value: str) -> str:
        _check_urls(value, ("amqp", "amqps"), "amqp://user:password@host:5672/vhost")
        return value

    @field_validator("stream_url")
    @classmethod
    def _check_stream(cls, value: str | None) -> str | None:
        if value is not None:
            _check_urls(
                value,
                ("rabbitmq-stream", "rabbitmq-stream+tls"),
                "rabbitmq-stream://user:password@host:5552/vhost",
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, value: str) -> str:
        if "+sentinel://" in value:
            SentinelTarget.parse(value)
            return value
        if "+cluster://" in value:
            ClusterTarget.parse(value)
            return value
        parts = _split(value)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ValueError(
                "must look like redis://[user:password@]host:6379/0, "
                "redis+sentinel://[user:password@]host1:26379,host2:26379/<master>/0 or "
                "redis+cluster://[user:password@]host1:7001,host2:7002"
            )
        return value

    @model_validator(mode="after")
    def _check_client(self) -> Settings:
        self.client.keys()  # malformed keys are a settings error, not a runtime one
        if (
            self.auth.mode == "enforce"
            and self.auth.secret is None
            and not (self.auth.accept_unsigned_amqp)
        ):
            raise ValueError("auth.mode=enforce needs auth.secret (or accept_unsigned_amqp)")
        if self.client.ttl <= self.client.heartbeat_interval:
            raise ValueError("client.ttl must be longer than client.heartbeat_interval")
        if self.client.ttl * 2 > self.worker.replay_window:
            raise ValueError("worker.replay_window must be at least twice client.ttl")
        return self

    def to_env(self, *, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
        """``BUSREG_*`` variables that make a child process (``python -m busreg ...``) load
        these settings; ``exclude`` names variables to leave out (``"WORKER__METRICS_PORT"``).
        The auth group is never passed on: the workers' secret stays where it was given."""
        env = {
            "BUSREG_AMQP_URL": self.amqp_url,
            "BUSREG_REDIS_URL": self.redis_url,
            "BUSREG_NAMESPACE": self.namespace,
            "BUSREG_PARTITIONS": str(self.partitions),
            "BUSREG_STREAM_MAX_BYTES": str(self.stream_max_bytes),
            "BUSREG_STREAM_SEGMENT_BYTES": str(self.stream_segment_bytes),
        }
        if self.stream_url:
            env["BUSREG_STREAM_URL"] = self.stream_url
        if self.stream_load_balancer:
            env["BUSREG_STREAM_LOAD_BALANCER"] = "true"
        if self.stream_replicas is not None:
            env["BUSREG_STREAM_REPLICAS"] = str(self.stream_replicas)
        for group, model in (("WORKER", self.worker), ("CLIENT", self.client)):
            for name, value in model:
                if value is None:
                    continue
                if isinstance(value, SecretStr):
                    value = value.get_secret_value()
                env[f"BUSREG_{group}__{name.upper()}"] = str(value)
        return {k: v for k, v in env.items() if k.removeprefix("BUSREG_") not in exclude}

    def redis_sentinel(self) -> SentinelTarget | None:
        """The Sentinels and master name if ``redis_url`` names Sentinels, else None."""
        return SentinelTarget.parse(self.redis_url) if "+sentinel://" in self.redis_url else None

    def redis_cluster(self) -> ClusterTarget | None:
        """The start nodes if ``redis_url`` names a Redis Cluster, else None."""
        return ClusterTarget.parse(self.redis_url) if "+cluster://" in self.redis_url else None

    def amqp_urls(self) -> list[str]:
        """The AMQP URLs, in the order connections try them."""
        return _urls(self.amqp_url)

    def stream_replica_count(self) -> int:
        """``stream_replicas``, or one per AMQP URL (at most 3)."""
        return self.stream_replicas or min(3, len(self.amqp_urls()))

    def stream_endpoints(self) -> list[StreamEndpoint]:
        """The stream listeners: ``stream_url``'s if set, else each AMQP URL's host (user,
        vhost) on port 5552 (5551 with amqps)."""
        if self.stream_url is not None:
            return [_stream_endpoint(u, stream=True) for u in _urls(self.stream_url)]
        return [_stream_endpoint(u, stream=False) for u in self.amqp_urls()]

    def stream_endpoint(self) -> StreamEndpoint:
        """The first stream listener (see stream_endpoints)."""
        return self.stream_endpoints()[0]


def _stream_endpoint(url: str, *, stream: bool) -> StreamEndpoint:
    parts = urlsplit(url)
    if stream:
        tls = parts.scheme.endswith("+tls")
        port = parts.port or (5551 if tls else 5552)
    else:
        tls = parts.scheme == "amqps"
        port = 5551 if tls else 5552
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return StreamEndpoint(
        host=parts.hostname or "127.0.0.1",
        port=port,
        username=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        vhost=vhost,
        ssl_context=ssl.create_default_context() if tls else None,
    )


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus overrides; errors become ConfigurationError."""
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigurationError(f"invalid settings: {problems}") from exc
