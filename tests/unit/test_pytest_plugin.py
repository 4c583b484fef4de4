"""The pytest entry point names every fixture busreg.testing defines (so a project without
pytest-asyncio gets the install hint for each of them, not "fixture not found")."""

from __future__ import annotations

import busreg.testing
from busreg import pytest_plugin


def test_the_fallback_covers_every_fixture() -> None:
    defined = {n for n in busreg.testing.__all__ if n.startswith("busreg_")}
    assert set(pytest_plugin.FIXTURES) == defined


def test_with_pytest_asyncio_the_real_plugin_is_loaded() -> None:
    assert pytest_plugin.pytest_plugins == ["busreg.testing"]
