"""``redis+sentinel://`` and ``redis+cluster://`` URLs: what they mean, and clear errors for
what they cannot."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from busreg import Settings
from busreg.urls import ClusterTarget, SentinelTarget


def test_hosts_master_db_and_credentials() -> None:
    t = SentinelTarget.parse("redis+sentinel://u:p%40ss@h1:26379,h2:26380/mymaster/3")
    assert t.sentinels == (("h1", 26379), ("h2", 26380))
    assert (t.master, t.db, t.username, t.password, t.tls) == ("mymaster", 3, "u", "p@ss", False)


def test_password_only_default_db_and_tls() -> None:
    t = SentinelTarget.parse("rediss+sentinel://:secret@h1:26379/m")
    assert (t.username, t.password, t.db, t.tls) == (None, "secret", 0, True)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h1:26379", "name the Sentinel master"),
        ("redis+sentinel://h1/m/0", "must be host:port"),
        ("redis+sentinel://h1:26379/m/x", "must be a number"),
        ("redis+sentinel://h1:26379,:5/m/0", "must be host:port"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SentinelTarget.parse(url)
    with pytest.raises(ValidationError, match=message):
        Settings(redis_url=url)


def test_settings_expose_the_target_only_for_sentinel_urls() -> None:
    assert Settings(redis_url="redis://127.0.0.1:6379/0").redis_sentinel() is None
    target = Settings(redis_url="redis+sentinel://a:1,b:2/m/0").redis_sentinel()
    assert target is not None
    assert target.sentinels == (("a", 1), ("b", 2))


def test_cluster_nodes_and_credentials() -> None:
    t = ClusterTarget.parse("rediss+cluster://u:p%3A1@r1:7001,[::1]:7002")
    assert t.nodes == (("r1", 7001), ("::1", 7002))
    assert (t.username, t.password, t.tls) == ("u", "p:1", True)
    assert ClusterTarget.parse("redis+cluster://r1:7001/0").tls is False


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://r1:7001/3", "database 0 only"),
        ("redis+cluster://r1", "must be host:port"),
        ("redis+cluster://", "must look like"),
    ],
)
def test_bad_cluster_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterTarget.parse(url)
    with pytest.raises(ValidationError, match=message):
        Settings(redis_url=url)


def test_settings_expose_the_cluster_only_for_cluster_urls() -> None:
    assert Settings(redis_url="redis+sentinel://a:1/m/0").redis_cluster() is None
    target = Settings(redis_url="redis+cluster://a:1,b:2").redis_cluster()
    assert target is not None
    assert target.nodes == (("a", 1), ("b", 2))
