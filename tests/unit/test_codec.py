"""busreg.wire.codec: decoding ingest messages (raw JSON and AMQP 1.0) and canonical instances."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import rstream
from hypothesis import example, given, settings
from hypothesis import strategies as st

from busreg.constants import MAX_EVENT_BYTES
from busreg.errors import InvalidEvent
from busreg.wire.codec import decode_ingest, encode_event, encode_instance
from busreg.wire.models import Instance, InstanceStatus, Register

from . import examples as ex

REASONS = {"oversized", "malformed", "unknown-version", "invalid"}


def _raw(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(encode_event(ex.register()))
    data.update(fields)
    return data


def _reason(body: bytes) -> str:
    with pytest.raises(InvalidEvent) as info:
        decode_ingest(body)
    assert info.value.reason in REASONS
    return info.value.reason


def _outcome(body: bytes) -> str:
    """ "ok" or the InvalidEvent reason; any other exception propagates (and fails)."""
    try:
        decode_ingest(body)
    except InvalidEvent as exc:
        return exc.reason
    return "ok"


def _amqp(body: bytes, user_id: bytes | None = b"svc") -> bytes:
    props = rstream.Properties(user_id=user_id) if user_id is not None else None
    return bytes(rstream.AMQPMessage(body=body, properties=props))


# --- valid events ---------------------------------------------------------------------------


@pytest.mark.parametrize("event", ex.ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_raw_json_round_trip(event: Any) -> None:
    decoded = decode_ingest(encode_event(event))
    assert decoded.event == event
    assert type(decoded.event) is type(event)
    assert decoded.user_id is None


def test_defaults_of_a_minimal_register() -> None:
    body = (
        b'{"v":1,"type":"register","service":"inventory","instance_id":"inv-1",'
        b'"incarnation":5,"seq":0,"address":"10.0.0.7:8080"}'
    )
    event = decode_ingest(body).event
    assert event == ex.register(incarnation=5, seq=0, zone="default", metadata={})
    assert isinstance(event, Register)
    assert event.status is InstanceStatus.UP


@pytest.mark.parametrize("event", ex.ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_amqp_1_0_message_carries_event_and_user_id(event: Any) -> None:
    decoded = decode_ingest(_amqp(encode_event(event)))
    assert decoded.event == event
    assert decoded.user_id == "svc"


def test_amqp_message_without_properties_has_no_user_id() -> None:
    decoded = decode_ingest(_amqp(encode_event(ex.heartbeat()), user_id=None))
    assert decoded.event == ex.heartbeat()
    assert decoded.user_id is None


def test_size_limit_is_inclusive() -> None:
    body = encode_event(ex.register())
    at_limit = body[:-1] + b" " * (MAX_EVENT_BYTES - len(body)) + b"}"
    assert len(at_limit) == MAX_EVENT_BYTES
    assert decode_ingest(at_limit).event == ex.register()
    assert _reason(at_limit + b" ") == "oversized"


# --- reasons ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{" + b" " * MAX_EVENT_BYTES + b"}",
        b"\x00" * (MAX_EVENT_BYTES + 1),
        _amqp(b"{" + b" " * MAX_EVENT_BYTES + b"}"),
    ],
    ids=["raw-json", "garbage", "amqp"],
)
def test_oversized(body: bytes) -> None:
    assert _reason(body) == "oversized"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe\x00garbage",
        b"hello",
        b"\x00Su",
        encode_event(ex.register())[:-7],  # truncated JSON
        b'{"v":1,"type":"tick","worker":"w"} trailing',
        b"[1, 2, 3]",  # a JSON array
        b'[{"v":1,"type":"tick","worker":"w"}]',
        b'{"v":1,"type":"tick","worker":"\xff"}',  # not UTF-8
        _amqp(b"not json"),
        _amqp(b'["an", "array"]'),
    ],
)
def test_malformed(body: bytes) -> None:
    assert _reason(body) == "malformed"


@pytest.mark.parametrize(
    "data",
    [
        _raw(v=3),
        _raw(v=0),
        _raw(v="1"),
        _raw(v=None),
        {k: v for k, v in _raw().items() if k != "v"},
    ],
    ids=["v=3", "v=0", "v='1'", "v=null", "no-v"],
)
def test_unknown_version(data: dict[str, Any]) -> None:
    assert _reason(orjson.dumps(data)) == "unknown-version"


def test_v2_is_the_batch_only() -> None:
    # contract v2 adds the batched heartbeat; a single event stays v1
    assert _reason(orjson.dumps(_raw(v=2))) == "invalid"


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (_raw(service="bad name!"), "service"),
        (_raw(service=""), "service"),
        (_raw(service="x" * 101), "service"),
        (_raw(seq=-1), "seq"),
        (_raw(seq=2**53), "seq"),
        (_raw(incarnation=-5), "incarnation"),
        (_raw(extra="field"), "extra"),
        (_raw(seq="abc"), "seq"),
        (_raw(incarnation=[1]), "incarnation"),
        (_raw(metadata={"k": 1}), "metadata"),
        (_raw(metadata=["k"]), "metadata"),
        (_raw(status="ALIVE"), "status"),
        (_raw(ttl=0), "ttl"),
        (_raw(type="explode"), ""),
        ({"v": 1}, ""),
        ({"v": 1, "type": "tick"}, "worker"),
        (
            {
                "v": 1,
                "type": "deregister",
                "service": "a",
                "instance_id": "b",
                "incarnation": 1,
                "seq": 1,
                "address": "h:1",
            },
            "address",
        ),
    ],
)
def test_invalid(data: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_ingest(orjson.dumps(data))
    assert info.value.reason == "invalid"
    assert where in info.value.detail


def test_invalid_inside_amqp() -> None:
    body = _amqp(orjson.dumps(_raw(seq=-1)))
    assert _reason(body) == "invalid"


def test_invalid_event_carries_reason_and_detail() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_ingest(orjson.dumps(_raw(v=3)))
    assert info.value.reason == "unknown-version"
    assert "v=3" in info.value.detail
    assert str(info.value).startswith("unknown-version: ")


# --- robustness (invariant 6: bad input never stops a partition) ------------------------------

AMQP_PREFIXES = [b"", b"\x00Su", b"\x00Ss", b"\x00Sw", b"\x00Sp", _amqp(b"{}")[:20]]


@settings(max_examples=400, deadline=None)
@given(
    body=st.binary(max_size=600)
    | st.builds(lambda p, b: p + b, st.sampled_from(AMQP_PREFIXES), st.binary(max_size=64))
)
@example(body=b"{")
@example(body=b"\x00")
@example(body=b"\x00S")
def test_arbitrary_bytes_only_raise_invalid_event(body: bytes) -> None:
    assert _outcome(body) in REASONS | {"ok"}


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from([*sorted(_raw()), "worker", "x"]), json_values, max_size=10
    ),
    base=st.sampled_from([{}, _raw(), {"v": 1, "type": "tick", "worker": "w"}]),
)
def test_json_objects_only_raise_invalid_event(
    fields: dict[str, Any], base: dict[str, Any]
) -> None:
    body = json.dumps({**base, **fields}).encode()  # stdlib: big ints too
    assert _outcome(body) in REASONS | {"ok"}


# --- regressions of bugs found by these tests -----------------------------------------------


def test_amqp_body_list_with_non_binary_item_is_malformed() -> None:
    # a data section whose value is an AMQP list holding a null
    assert _reason(bytes.fromhex("005375c0020140")) == "malformed"


def test_amqp_user_id_not_utf8_is_malformed() -> None:
    body = _amqp(encode_event(ex.tick()), user_id=b"\xff\xfe")
    assert _reason(body) == "malformed"


# --- canonical instance JSON ------------------------------------------------------------------


def test_encode_instance_sorts_keys_at_every_level() -> None:
    text = encode_instance(ex.instance(metadata={"zz": "1", "aa": "2", "mm": "3"}))
    data = orjson.loads(text)
    assert list(data) == sorted(data)
    assert list(data["metadata"]) == ["aa", "mm", "zz"]
    assert set(data) == set(Instance.model_fields) - {"override"}  # written only while set
    assert " " not in text.replace("10.0.0.7", "")  # compact


def test_encode_instance_equal_instances_equal_strings() -> None:
    a = ex.instance(metadata={"a": "1", "b": "2", "c": "3"})
    b = ex.instance(metadata={"c": "3", "a": "1", "b": "2"})
    assert a == b
    assert encode_instance(a) == encode_instance(b)
    assert encode_instance(ex.register().instance()) == encode_instance(
        ex.heartbeat(seq=99).instance()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"metadata": {"version": "2.2"}},
        {"status": InstanceStatus.DOWN},
        {"address": "10.0.0.8:8080"},
        {"zone": "eu-1b"},
        {"ttl": 5.0},
        {"incarnation": ex.INCARNATION + 1},
    ],
)
def test_encode_instance_differs_on_any_visible_change(change: dict[str, Any]) -> None:
    assert encode_instance(ex.instance()) != encode_instance(ex.instance(**change))


def test_encode_instance_round_trips() -> None:
    inst = ex.instance(address="[::1]:8080", status=InstanceStatus.STARTING)
    assert Instance.model_validate_json(encode_instance(inst)) == inst


@settings(max_examples=100, deadline=None)
@given(
    items=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=10), max_size=20),
    data=st.data(),
)
def test_encode_instance_ignores_metadata_order(items: dict[str, str], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(list(items.items())))
    a = ex.instance(metadata=items)
    b = ex.instance(metadata=dict(shuffled))
    assert encode_instance(a) == encode_instance(b)


# --- the worker's fast path produces the canonical instance JSON ----------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from busreg.wire.codec import encode_stored  # noqa: E402
from busreg.wire.models import Heartbeat, InstanceStatus  # noqa: E402


@given(
    metadata=st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=30), max_size=5),
    status=st.sampled_from(list(InstanceStatus)),
    ttl=st.floats(min_value=0.1, max_value=60),
    incarnation=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_encode_stored_is_the_instance_without_its_key_fields(
    metadata: dict[str, str], status: InstanceStatus, ttl: float, incarnation: int
) -> None:
    event = Heartbeat(
        service="inventory",
        instance_id="i-1",
        incarnation=incarnation,
        seq=1,
        address="[::1]:8080",
        zone="eu-1a",
        status=status,
        metadata=metadata,
        ttl=ttl,
    )
    stored = encode_stored(event)
    # apply.lua splices '{"instance_id":..,"service":..,' in place of the opening brace
    assert stored.startswith('{"address":')
    full = {**orjson.loads(stored), "service": "inventory", "instance_id": "i-1"}
    assert full == event.instance().model_dump(mode="json", exclude={"override"})
    # canonical: the worker compares stored strings to tell a heartbeat from a change
    assert stored == orjson.dumps(orjson.loads(stored), option=orjson.OPT_SORT_KEYS).decode()
