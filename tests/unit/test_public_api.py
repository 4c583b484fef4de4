"""The public surface of ``busreg`` and its exception hierarchy."""

from __future__ import annotations

import inspect
import re

import pytest

import busreg
from busreg import errors

# Changing this list is an API change: update it on purpose, with the docs and changelog.
EXPECTED_ALL = [
    "AuthenticationFailed",
    "BusregError",
    "Change",
    "ClientSettings",
    "ClosedError",
    "ConfigurationError",
    "ConnectionFailed",
    "Delta",
    "DeltaKind",
    "Fenced",
    "Instance",
    "InstanceStatus",
    "InvalidEvent",
    "NoInstanceAvailable",
    "PartitionMismatch",
    "PublishFailed",
    "Registration",
    "HttpCheck",
    "TcpCheck",
    "CommandCheck",
    "Registry",
    "RequestTimeout",
    "RetryBudget",
    "RetryPolicy",
    "RoundRobin",
    "ServiceView",
    "Settings",
    "Snapshot",
    "StatusOverride",
    "TopologyMissing",
    "Worker",
    "WorkerSettings",
    "ZoneAware",
    "__version__",
    "partition_for",
]

FOREIGN_PACKAGES = ("aio_pika", "aiormq", "pamqp", "redis", "rstream")


def test_all_is_the_guarded_list() -> None:
    assert sorted(busreg.__all__) == sorted(EXPECTED_ALL)
    assert len(set(busreg.__all__)) == len(busreg.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from busreg import {name}", namespace)  # the way users import it
    assert namespace[name] is getattr(busreg, name)


def test_version_matches_distribution() -> None:
    from importlib.metadata import version

    assert busreg.__version__ == version("busreg")


def _foreign(cls: type) -> list[str]:
    return [
        f"{base.__module__}.{base.__qualname__}"
        for base in cls.__mro__
        if base.__module__.split(".")[0] in FOREIGN_PACKAGES
    ]


def test_no_broker_or_redis_exception_is_exported() -> None:
    for name in busreg.__all__:
        obj = getattr(busreg, name)
        if inspect.isclass(obj):
            assert not _foreign(obj), f"busreg.{name} derives from {_foreign(obj)}"
            if issubclass(obj, BaseException):
                assert issubclass(obj, errors.BusregError), name


def test_every_exported_error_is_a_busreg_error() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert inspect.isclass(cls)
        assert issubclass(cls, errors.BusregError), name
        assert not _foreign(cls), name
        assert getattr(busreg, name) is cls, f"busreg.{name} is not exported"


def test_errors_all_lists_every_error_class() -> None:
    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }
    assert defined == set(errors.__all__)


def _docstring_tree() -> dict[str, str | None]:
    """class name -> parent name, read from the tree drawn in busreg/errors.py's docstring."""
    doc = errors.__doc__ or ""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column, name)
    for line in doc.splitlines():
        match = re.match(r"^([\s│├└─]*)([A-Z]\w+)(?:\s|$)", line)
        if match is None:
            continue
        prefix, name = match.groups()
        if name != "BusregError" and not prefix.strip():
            continue  # prose, not a node of the tree
        column = len(prefix)
        while stack and stack[-1][0] >= column:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((column, name))
    return parents


def test_errors_docstring_tree_names_every_class_with_its_parent() -> None:
    tree = _docstring_tree()
    assert set(tree) == set(errors.__all__), "the tree in errors.py's docstring is out of date"
    for name, parent in tree.items():
        cls = getattr(errors, name)
        if parent is None:
            assert cls is errors.BusregError
        else:
            assert cls.__bases__ == (getattr(errors, parent),), f"{name} is drawn under {parent}"


def test_invalid_event_keeps_reason_and_detail() -> None:
    exc = errors.InvalidEvent("malformed", "not JSON")
    assert (exc.reason, exc.detail, str(exc)) == ("malformed", "not JSON", "malformed: not JSON")
    assert str(errors.InvalidEvent("oversized")) == "oversized"
