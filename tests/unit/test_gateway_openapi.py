"""The committed ``schemas/gateway-openapi.json`` is what the code generates, and it
documents every route of the app; gateway settings keep their secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from busreg.gateway import routes
from busreg.gateway.openapi import ENDPOINTS, build_openapi, render
from busreg.settings import Settings

COMMITTED = Path(__file__).resolve().parents[2] / "schemas" / "gateway-openapi.json"
REGENERATE = "regenerate with: python -m busreg.gateway.openapi schemas/gateway-openapi.json"


def test_committed_openapi_is_up_to_date() -> None:
    document = build_openapi()
    text = COMMITTED.read_text(encoding="utf-8")
    assert json.loads(text) == document, f"schemas/gateway-openapi.json differs; {REGENERATE}"
    assert text == render(document), f"not formatted as generated; {REGENERATE}"


def test_every_api_route_is_documented() -> None:
    from starlette.routing import Route

    served = {r.path for r in routes(route=True) if isinstance(r, Route) and r.include_in_schema}
    assert served == {e.path for e in ENDPOINTS}
    for endpoint in ENDPOINTS:
        assert endpoint.handler.__doc__, f"{endpoint.path}: the docstring is its description"


def test_gateway_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSREG_GATEWAY__PORT", "9000")
    monkeypatch.setenv("BUSREG_GATEWAY__OPERATOR", "true")
    monkeypatch.setenv("BUSREG_GATEWAY__AUTH__TOKEN", "tok-123")
    monkeypatch.setenv("BUSREG_GATEWAY__AUTH__USERS", "ann:pw-456,bo:pw-789")
    settings = Settings()
    gw = settings.gateway
    assert (gw.host, gw.port, gw.operator, gw.route) == ("127.0.0.1", 9000, True, False)
    assert gw.auth.user_map() == {"ann": "pw-456", "bo": "pw-789"}
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    for secret in ("tok-123", "pw-456", "pw-789"):
        assert secret not in shown
    assert "BUSREG_GATEWAY__AUTH__TOKEN" not in settings.to_env()


def test_bad_gateway_settings_do_not_echo_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSREG_GATEWAY__AUTH__USERS", "ann:pw-456,nopassword")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "user:password" in str(info.value)
    assert "pw-456" not in str(info.value)
    monkeypatch.delenv("BUSREG_GATEWAY__AUTH__USERS")
    monkeypatch.setenv("BUSREG_GATEWAY__MAX_STREAMS", "5000")
    with pytest.raises(ValidationError, match="max_streams must be below"):
        Settings()
