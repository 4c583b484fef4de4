"""The container-backed suite: needs a Docker engine (brokers/docker.sh start; images) and
runs only when asked, with BUSREG_CONTAINER_TESTS=1 (stage "containers" of .ci/run), so a
plain `pytest tests` never collects it. See README, "Testing"."""

from __future__ import annotations

import os

import pytest

if os.environ.get("BUSREG_CONTAINER_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "containers: needs Docker (tests/containers)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.containers)
