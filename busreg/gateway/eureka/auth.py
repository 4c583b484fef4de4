"""Who may call the Eureka API, and for which services. Pure: decisions from headers.

Eureka clients authenticate with HTTP basic auth (Spring Cloud:
``http://user:pass@host/eureka/``). A user may write for the services ``auth.owners`` maps
it to (fnmatch patterns, the mapping broker users have), else for the service of its own
name: the same rule as ``busreg.wire.auth.Authorizer.may_act``. The gateway then publishes
the events itself, signed with service keys derived from ``auth.secret`` (a trusted
component, like a worker), so the workers' checks apply as to any registrant.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging

from busreg.gateway.eureka.settings import EurekaSettings
from busreg.settings import AuthSettings
from busreg.wire.auth import Authorizer

__all__ = ["Denied", "EurekaAuth"]

log = logging.getLogger("busreg.gateway.eureka")


class Denied(Exception):
    """A refused call: ``status`` 401 (who are you), 403 (not for this service) or 503
    (this gateway cannot sign events)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class EurekaAuth:
    def __init__(self, eureka: EurekaSettings, auth: AuthSettings) -> None:
        self.users = eureka.user_map()
        self.enforce = auth.mode == "enforce"
        self.anonymous_writes = eureka.allow_anonymous_writes and not self.enforce
        self.can_sign = not self.enforce or auth.secret is not None
        self._owners = Authorizer(secret=None, owners=auth.owners)
        self._requested_anonymous = eureka.allow_anonymous_writes

    @property
    def closed(self) -> bool:
        """Every request must authenticate (users configured, or enforce mode)."""
        return bool(self.users) or self.enforce

    def announce(self) -> None:
        """Say at start what the Eureka API lets through (loudly when it is open)."""
        if self.anonymous_writes:
            log.warning(
                "EUREKA API ACCEPTS ANONYMOUS WRITES (gateway.eureka.allow_anonymous_writes): "
                "anyone who reaches the gateway can register, renew and cancel any instance; "
                "for development only"
            )
        elif self._requested_anonymous:
            log.error(
                "gateway.eureka.allow_anonymous_writes is ignored in auth.mode=enforce: "
                "Eureka writes need gateway.eureka.users"
            )
        if self.enforce and not self.users:
            log.error(
                "auth.mode=enforce and no gateway.eureka.users: the Eureka API refuses "
                "every request"
            )
        if not self.can_sign:
            log.error(
                "auth.mode=enforce without auth.secret: the gateway cannot sign the events of "
                "Eureka clients, so Eureka writes are refused (503)"
            )
        if not self.users and not self.anonymous_writes and not self.enforce:
            log.info("Eureka API is read-only: no gateway.eureka.users configured")

    def user(self, authorization: str | None) -> str | None:
        """The basic-auth user the header proves, or None."""
        if not self.users or authorization is None:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = (
                base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return None
        expected = self.users.get(user)
        # compared even for an unknown user, so timing does not tell users apart
        ok = _same(password, expected if expected is not None else "\0" + password)
        return user if sep and expected is not None and ok else None

    def reader(self, authorization: str | None) -> str | None:
        """The caller of a read; raises Denied(401) when the API is closed to strangers."""
        user = self.user(authorization)
        if user is None and self.closed:
            raise Denied(401, "authentication required: give a Eureka user (basic auth)")
        return user

    def writer(self, authorization: str | None, service: str) -> str:
        """Who writes for ``service`` (the ``by`` of an override); raises Denied."""
        user = self.user(authorization)
        if user is None:
            if self.closed:
                raise Denied(401, "authentication required: give a Eureka user (basic auth)")
            if not self.anonymous_writes:
                raise Denied(
                    403,
                    "the Eureka API is read-only: configure gateway.eureka.users "
                    "(or, for development, gateway.eureka.allow_anonymous_writes=true)",
                )
        elif not self._owners.may_act(user, service):
            raise Denied(403, f"user {user!r} may not act for service {service!r}")
        if not self.can_sign:
            raise Denied(503, "this gateway cannot sign events (auth.secret is not set)")
        return user or "anonymous"
