"""busreg's pytest entry point (``pytest11``): every pytest run in an environment that has
busreg installed loads this module, so it must work there whatever else is installed.

With pytest-asyncio (``pip install 'busreg[testing]'``) it loads the fixtures of
``busreg.testing``. Without it, the rest of the project's tests run as before, and a test
that asks for a busreg fixture fails with one line saying what to install. To keep busreg
out of a pytest run altogether: ``pytest -p no:busreg``.
"""

from __future__ import annotations

import importlib.util

import pytest

__all__: list[str] = []

#: the fixtures busreg.testing defines (tests/unit/test_pytest_plugin.py keeps this true)
FIXTURES = (
    "busreg_servers",
    "busreg_settings",
    "busreg_namespace",
    "busreg_worker",
    "busreg_registry",
)
HINT = "busreg's pytest fixtures need pytest-asyncio: pip install 'busreg[testing]'"

if importlib.util.find_spec("pytest_asyncio") is not None:
    pytest_plugins = ["busreg.testing"]
else:

    def _unavailable() -> None:
        pytest.fail(HINT, pytrace=False)

    for _name in FIXTURES:
        globals()[_name] = pytest.fixture(name=_name)(_unavailable)

    def pytest_configure(config: pytest.Config) -> None:
        config.addinivalue_line("markers", "busreg(partitions=N): see busreg.testing")
