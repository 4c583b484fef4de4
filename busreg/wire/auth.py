"""Who may write events for which service (invariant 7). Pure; no I/O.

Two ways to prove an identity, one per ingest path:

* **Signed events** (any path, and the only one over the stream protocol, where the broker
  vouches for no per-message identity): the message is ``<sig>.<json>``, where ``sig`` is 64
  lowercase hex digits of HMAC-SHA256 over the exact JSON bytes, keyed with the *service
  key*: ``HMAC-SHA256(secret, "busreg-service-key/v1/" + service)``. Only workers hold the
  secret; a registrant gets its own service's key (``busreg keys SERVICE``), so a key for
  ``billing`` can sign nothing for ``inventory``.

      key = service_key(secret, "inventory")
      body = sign(key, json_bytes)             # b"3f1c...e9.{...}"

* **Broker-validated user_id** (AMQP 0-9-1 publishers): RabbitMQ refuses a message whose
  ``user_id`` is not the connection's user, so the worker can trust it, *provided no
  untrusted principal may write to the ingest streams directly* (a stream-protocol writer
  can put any user_id in an AMQP-encoded message). The owner mapping says which identities
  may act for which services (``fnmatch`` patterns); an identity not in the mapping may act
  for the service of the same name only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass

__all__ = [
    "ADMIN",
    "SIGNATURE_HEX",
    "Authorizer",
    "admin_key",
    "service_key",
    "sign",
    "split_signed",
    "worker_key",
]

#: Length of the hex signature before the "." of a signed event.
SIGNATURE_HEX = 64
_KEY_CONTEXT = b"busreg-service-key/v1/"
_HEX = frozenset(b"0123456789abcdef")


def service_key(secret: bytes, service: str) -> bytes:
    """The signing key of ``service``, derived from the workers' secret."""
    return hmac.new(secret, _KEY_CONTEXT + service.encode(), hashlib.sha256).digest()


#: What the workers' own key is derived for: not a service name (those cannot start with
#: "~"), so no service key a registrant holds can sign as a worker.
_WORKERS = "~workers"


def worker_key(secret: bytes) -> bytes:
    """The key workers sign their outage marks with (a Tick with ``outage``)."""
    return service_key(secret, _WORKERS)


#: The operators' identity: its key signs status overrides (``busreg set-status``) for any
#: service, and nothing else. ``busreg keys --admin`` prints it as ``~admin=<hex>``, the form
#: ``BUSREG_CLIENT__SIGNING_KEYS`` takes.
ADMIN = "~admin"


def admin_key(secret: bytes) -> bytes:
    """The key operators sign status overrides with, for any service."""
    return service_key(secret, ADMIN)


def sign(key: bytes, payload: bytes) -> bytes:
    """``<hex HMAC>.<payload>``: the wire form of a signed event."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode() + b"." + payload


def split_signed(body: bytes) -> tuple[bytes | None, bytes]:
    """(signature hex, payload) of a signed event; (None, body) for an unsigned one."""
    if len(body) > SIGNATURE_HEX and body[SIGNATURE_HEX] == 0x2E and _HEX.issuperset(
        body[:SIGNATURE_HEX]
    ):
        return body[:SIGNATURE_HEX], body[SIGNATURE_HEX + 1 :]
    return None, body


@dataclass(frozen=True)
class Authorizer:
    """Decides whether an event may act for the service it names.

    ``Authorizer(secret=b"...", owners={"billing-app": ["billing", "billing-*"]})``
    """

    secret: bytes | None
    owners: dict[str, list[str]]
    accept_unsigned_amqp: bool = False

    def check(
        self, service: str, payload: bytes, signature: bytes | None, user_id: str | None
    ) -> str | None:
        """None if allowed, else a short reason for the dead letter."""
        if user_id is not None and not self.may_act(user_id, service):
            return f"user {user_id!r} may not act for service {service!r}"
        if signature is not None:
            if self.secret is None:
                return "signed event, but this worker has no auth secret"
            expected = hmac.new(service_key(self.secret, service), payload, hashlib.sha256)
            if not hmac.compare_digest(expected.hexdigest().encode(), signature):
                return f"bad signature for service {service!r}"
            return None
        if user_id is not None and self.accept_unsigned_amqp:
            return None
        return "unsigned event (sign it with the service key, or publish over AMQP as an owner)"

    def check_override(
        self, service: str, payload: bytes, signature: bytes | None, user_id: str | None
    ) -> tuple[str | None, str | None]:
        """``(refusal, identity)`` of an operator's status override: allowed for whoever may
        act for the service (its key, or an owner over AMQP), and for the admin key.
        ``identity`` names who was verified: ``"user:<name>"``, ``"key:<service>"`` or
        ``"admin-key"``."""
        if signature is not None and self.secret is not None:
            expected = hmac.new(admin_key(self.secret), payload, hashlib.sha256)
            if hmac.compare_digest(expected.hexdigest().encode(), signature):
                return None, "admin-key"
        refusal = self.check(service, payload, signature, user_id)
        if refusal is not None:
            return refusal, None
        if signature is not None:
            return None, f"key:{service}"
        return None, f"user:{user_id}"

    def check_worker(self, payload: bytes, signature: bytes | None) -> str | None:
        """None if a worker signed ``payload`` (an outage mark), else the reason."""
        if signature is None or self.secret is None:
            return "unsigned outage mark (only workers, with the auth secret, may write one)"
        expected = hmac.new(worker_key(self.secret), payload, hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest().encode(), signature):
            return "bad signature on an outage mark"
        return None

    def may_act(self, identity: str, service: str) -> bool:
        patterns = self.owners.get(identity)
        if patterns is None:
            return identity == service
        return any(fnmatch.fnmatchcase(service, p) for p in patterns)
