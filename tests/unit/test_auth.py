"""Signing and authorisation rules, without servers."""

from __future__ import annotations

import pytest

from busreg.wire.auth import Authorizer, service_key, sign, split_signed
from busreg.wire.codec import decode_ingest, encode_event
from busreg.wire.models import Register

SECRET = b"workers-only-secret"


def _event(service: str = "inventory") -> bytes:
    return encode_event(
        Register(service=service, instance_id="i-1", incarnation=1, seq=1, address="h:80")
    )


def test_keys_differ_per_service_and_secret() -> None:
    assert service_key(SECRET, "inventory") != service_key(SECRET, "billing")
    assert service_key(SECRET, "inventory") != service_key(b"other", "inventory")
    assert len(service_key(SECRET, "inventory")) == 32


def test_signed_event_round_trips_through_the_decoder() -> None:
    body = sign(service_key(SECRET, "inventory"), _event())
    decoded = decode_ingest(body)
    assert decoded.signature is not None
    assert decoded.payload == _event()
    auth = Authorizer(SECRET, {})
    assert auth.check("inventory", decoded.payload, decoded.signature, None) is None


def test_split_leaves_unsigned_json_alone() -> None:
    assert split_signed(_event()) == (None, _event())
    assert split_signed(b"ab." + _event())[0] is None


@pytest.mark.parametrize(
    ("signer", "service", "reason"),
    [
        ("billing", "inventory", "bad signature"),  # billing's key, inventory's event
        (None, "inventory", "unsigned"),
    ],
)
def test_another_services_key_or_no_key_is_refused(
    signer: str | None, service: str, reason: str
) -> None:
    payload = _event(service)
    body = sign(service_key(SECRET, signer), payload) if signer else payload
    decoded = decode_ingest(body)
    refusal = Authorizer(SECRET, {}).check(service, decoded.payload, decoded.signature, None)
    assert refusal is not None
    assert reason in refusal


def test_tampered_payload_fails_the_signature() -> None:
    key = service_key(SECRET, "inventory")
    body = sign(key, _event()).replace(b'"h:80"', b'"evil:80"')
    decoded = decode_ingest(body)
    assert Authorizer(SECRET, {}).check("inventory", decoded.payload, decoded.signature, None)


def test_owner_mapping_for_broker_identities() -> None:
    auth = Authorizer(None, {"payments-team": ["billing", "billing-*"]}, accept_unsigned_amqp=True)
    assert auth.check("billing-eu", b"", None, "payments-team") is None
    assert auth.check("inventory", b"", None, "payments-team") is not None
    # an identity not in the mapping may act for its own name only
    assert auth.check("inventory", b"", None, "inventory") is None
    assert auth.check("billing", b"", None, "inventory") is not None


def test_unsigned_amqp_needs_the_explicit_trust_setting() -> None:
    assert Authorizer(SECRET, {}).check("inventory", b"", None, "inventory") is not None
    assert Authorizer(SECRET, {}, True).check("inventory", b"", None, "inventory") is None


def test_a_signature_does_not_excuse_a_foreign_user_id() -> None:
    payload = _event()
    body = sign(service_key(SECRET, "inventory"), payload)
    decoded = decode_ingest(body)
    refusal = Authorizer(SECRET, {}).check("inventory", payload, decoded.signature, "billing")
    assert refusal is not None
    assert "billing" in refusal
