"""Prometheus http_sd and Consul answers, built without I/O."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from busreg.gateway.auth import allowed
from busreg.gateway.catalog import Entry
from busreg.gateway.consul import ConsulQuery, check_status, health_entry, parse_wait, service_tags
from busreg.gateway.promsd import label_name, sd_groups, target_group
from busreg.wire.models import Instance, InstanceStatus


def inst(service: str, iid: str, **kw: object) -> Instance:
    return Instance.model_validate(
        {"service": service, "instance_id": iid, "incarnation": 7, "address": "10.1.2.3:8080"} | kw
    )


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("version", "version"),
        ("git.sha", "git_sha"),
        ("a-b/c d", "a_b_c_d"),
        ("1x", "1x"),
        ("ünï", "_n_"),
    ],
)
def test_label_names_are_sanitised(key: str, label: str) -> None:
    assert label_name(key) == label


def test_target_group_labels() -> None:
    group = target_group(inst("api", "i1", zone="eu", metadata={"a.b": "1", "a_b": "2"}))
    assert group["targets"] == ["10.1.2.3:8080"]
    assert group["labels"]["__meta_busreg_service"] == "api"
    assert group["labels"]["__meta_busreg_status"] == "UP"
    assert group["labels"]["__meta_busreg_zone"] == "eu"
    # two keys with one label name: the first in key order wins, whatever the dict order
    assert group["labels"]["__meta_busreg_metadata_a_b"] == "1"


def test_sd_groups_are_in_a_stable_order() -> None:
    b = Entry("b", "e", 1, {"z": inst("b", "z"), "a": inst("b", "a")})
    a = Entry("a", "e", 1, {"m": inst("a", "m")})
    order = [g["labels"]["__meta_busreg_instance_id"] for g in sd_groups([b, a])]
    assert order == ["m", "a", "z"]
    assert sd_groups([]) == []


def test_go_durations() -> None:
    assert parse_wait("120000ms") == 120.0
    assert parse_wait("1m30s") == 90.0
    assert parse_wait("1.5s") == 1.5
    assert parse_wait("10") == 10.0
    assert parse_wait("1h") == 600.0  # capped like Consul
    for bad in ("", "forever", "5x", "-1s", "1s junk"):
        with pytest.raises(ValueError, match="duration"):
            parse_wait(bad)


def test_consul_query() -> None:
    q = ConsulQuery.model_validate({"index": "12", "wait": "5s", "passing": "", "stale": ""})
    assert (q.index, q.wait, q.passing) == (12, 5.0, True)
    assert ConsulQuery.model_validate({}).wait == 300.0
    with pytest.raises(ValidationError):
        ConsulQuery.model_validate({"index": "-1"})
    with pytest.raises(ValidationError, match="not supported"):
        ConsulQuery.model_validate({"filter": "Service == x"})
    with pytest.raises(ValidationError):
        ConsulQuery.model_validate({"bogus": "1"})


def test_consul_rows() -> None:
    i = inst("api", "i1", status="OUT_OF_SERVICE", zone="eu", metadata={"tags": "b, a"})
    assert service_tags(i) == ["zone=eu", "a", "b"]
    assert check_status(i) == "maintenance"
    assert {check_status(inst("x", "y", status=s)) for s in InstanceStatus} == {
        "passing",
        "warning",
        "critical",
        "maintenance",
    }
    row = health_entry(i, "dc1")
    assert row["Node"]["Datacenter"] == "dc1"
    assert (row["Service"]["Address"], row["Service"]["Port"]) == ("10.1.2.3", 8080)
    assert row["Checks"][0]["Status"] == "maintenance"


def test_credentials() -> None:
    users = {"alice": "pw"}
    basic = "Basic YWxpY2U6cHc="  # alice:pw
    assert allowed("Bearer tok", None, "tok", {})
    assert allowed("bearer  tok ", None, "tok", {})
    assert allowed(None, "tok", "tok", {})
    assert allowed(basic, None, None, users)
    assert not allowed(None, None, "tok", users)
    assert not allowed("Bearer nope", "nope", "tok", users)
    assert not allowed("Basic YWxpY2U6eA==", None, None, users)  # alice:x
    assert not allowed("Basic Ym9iOnB3", None, None, users)  # bob:pw
    assert not allowed("Basic ???", None, None, users)
    assert not allowed(basic, None, "tok", {})  # basic users not configured
