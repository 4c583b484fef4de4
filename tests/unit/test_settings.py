"""busreg.settings: environment, nested groups, derived stream endpoint, clear errors."""

from __future__ import annotations

import os
import ssl

import pytest
from pydantic import ValidationError

from busreg import constants as c
from busreg.errors import ConfigurationError
from busreg.settings import Settings, WorkerSettings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BUSREG_* variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("BUSREG_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = Settings.model_validate({})  # environment + defaults
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.namespace == "busreg"
    assert s.partitions == 8
    assert s.stream_url is None
    assert s.client.heartbeat_interval == c.DEFAULT_HEARTBEAT_INTERVAL
    assert s.client.ttl == c.DEFAULT_TTL
    assert s.worker.tick_interval == c.DEFAULT_TICK_INTERVAL


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSREG_NAMESPACE", "prod")
    monkeypatch.setenv("BUSREG_PARTITIONS", "16")
    monkeypatch.setenv("BUSREG_AMQP_URL", "amqp://app:secret@mq:5672/prod")
    monkeypatch.setenv("NAMESPACE", "not-this-one")  # unprefixed: ignored
    s = load_settings()
    assert (s.namespace, s.partitions, s.amqp_url) == ("prod", 16, "amqp://app:secret@mq:5672/prod")


def test_nested_groups_use_double_underscore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSREG_WORKER__TICK_INTERVAL", "0.05")
    monkeypatch.setenv("BUSREG_WORKER__BATCH_MAX", "250")
    monkeypatch.setenv("BUSREG_CLIENT__TTL", "5")
    s = load_settings()
    assert s.worker.tick_interval == 0.05
    assert s.worker.batch_max == 250
    assert s.worker.lease_ttl == c.DEFAULT_LEASE_TTL  # untouched fields keep their defaults
    assert s.client.ttl == 5.0
    assert s.client.heartbeat_interval == c.DEFAULT_HEARTBEAT_INTERVAL


def test_overrides_win_over_environment_and_none_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BUSREG_NAMESPACE", "from-env")
    assert load_settings(namespace="explicit").namespace == "explicit"
    assert load_settings(namespace=None).namespace == "from-env"


@pytest.mark.parametrize(
    ("amqp_url", "host", "port", "user", "password", "vhost", "tls"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "127.0.0.1", 5552, "guest", "guest", "/", False),
        (
            "amqp://app:s%40cret@mq.example:5673/prod",
            "mq.example",
            5552,
            "app",
            "s@cret",
            "prod",
            False,
        ),
        ("amqp://app:pw@mq/%2F", "mq", 5552, "app", "pw", "/", False),
        ("amqp://mq", "mq", 5552, "guest", "guest", "/", False),
        ("amqps://app:pw@mq.example:5671/prod", "mq.example", 5551, "app", "pw", "prod", True),
        ("amqp://u:p@[::1]:5672/v", "::1", 5552, "u", "p", "v", False),
    ],
)
def test_stream_endpoint_derived_from_amqp_url(
    amqp_url: str, host: str, port: int, user: str, password: str, vhost: str, tls: bool
) -> None:
    ep = load_settings(amqp_url=amqp_url).stream_endpoint()
    assert (ep.host, ep.port, ep.username, ep.password, ep.vhost) == (
        host,
        port,
        user,
        password,
        vhost,
    )
    assert isinstance(ep.ssl_context, ssl.SSLContext) is tls


@pytest.mark.parametrize(
    ("stream_url", "host", "port", "vhost", "tls"),
    [
        ("rabbitmq-stream://u:p@streams:6000/v", "streams", 6000, "v", False),
        ("rabbitmq-stream://u:p@streams/", "streams", 5552, "/", False),
        ("rabbitmq-stream+tls://u:p@streams/v", "streams", 5551, "v", True),
    ],
)
def test_explicit_stream_url(
    monkeypatch: pytest.MonkeyPatch, stream_url: str, host: str, port: int, vhost: str, tls: bool
) -> None:
    monkeypatch.setenv("BUSREG_AMQP_URL", "amqps://other:x@elsewhere:5671/nope")
    monkeypatch.setenv("BUSREG_STREAM_URL", stream_url)
    ep = load_settings().stream_endpoint()
    assert (ep.host, ep.port, ep.username, ep.password, ep.vhost) == (host, port, "u", "p", vhost)
    assert isinstance(ep.ssl_context, ssl.SSLContext) is tls


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("amqp_url", "http://mq:5672/", "amqp://"),
        ("amqp_url", "mq:5672", "amqp://"),
        ("amqp_url", "amqp:///vhost", "amqp://"),
        ("amqp_url", "amqp://[::1/", "amqp_url"),
        ("stream_url", "amqp://mq:5552/", "rabbitmq-stream://"),
        ("stream_url", "rabbitmq-stream:///v", "rabbitmq-stream://"),
        ("redis_url", "http://r:6379/0", "redis://"),
        ("namespace", "has space", "namespace"),
        ("partitions", "0", "partitions"),
    ],
)
def test_invalid_values_raise_configuration_error(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str, hint: str
) -> None:
    monkeypatch.setenv(f"BUSREG_{field.upper()}", value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("invalid settings: ")
    assert field in message
    assert hint in message


def test_ttl_must_exceed_heartbeat_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSREG_CLIENT__HEARTBEAT_INTERVAL", "2")
    monkeypatch.setenv("BUSREG_CLIENT__TTL", "2")
    with pytest.raises(ConfigurationError, match="ttl must be longer than"):
        load_settings()
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        load_settings(client={"ttl": 1.5, "heartbeat_interval": 2})
    assert load_settings(client={"ttl": 2.5, "heartbeat_interval": 2}).client.ttl == 2.5


def test_replay_window_must_cover_two_ttls() -> None:
    with pytest.raises(ConfigurationError, match="replay_window"):
        load_settings(client={"ttl": 30}, worker={"replay_window": 59})
    assert load_settings(client={"ttl": 30}, worker={"replay_window": 60}).client.ttl == 30


def test_configuration_error_is_a_busreg_error() -> None:
    from busreg.errors import BusregError

    with pytest.raises(BusregError):
        load_settings(partitions=1000)


def test_bad_port_in_stream_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        load_settings(stream_url="rabbitmq-stream://u:p@streams:abc/").stream_endpoint()


def test_ticks_must_come_faster_than_the_largest_clock_step() -> None:
    """Ticks at or past max_clock_step would each read as an ingest outage (invariant 4:
    expiry would be held back by a fresh grace on every quiet partition)."""
    with pytest.raises(ValidationError, match=r"tick_interval .* must be below max_clock_step"):
        WorkerSettings(tick_interval=1.0, max_clock_step=1.0)
    assert WorkerSettings(tick_interval=0.5, max_clock_step=1.0).tick_interval == 0.5
