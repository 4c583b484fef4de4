"""Health checks (issue 15): thresholds (pure), and each probe against a real local server,
port or command. Invariant: the status a check publishes is what the service answers, with
the reason in ``busreg.check``; a flapping service does not flap the instance faster than
its thresholds allow."""

from __future__ import annotations

import socket

import pytest

from busreg import CommandCheck, HttpCheck, TcpCheck
from busreg.client.checks import CheckGate, CheckResult, parse_check
from busreg.errors import ConfigurationError
from busreg.wire.models import InstanceStatus as S

from ..checks_http import HealthServer

OK, BAD = CheckResult(True, "HTTP 200"), CheckResult(False, "HTTP 503")


def test_starting_until_the_first_pass_then_thresholds_both_ways() -> None:
    gate = CheckGate(failures=2, successes=2)
    assert gate.observe(BAD) is None  # starting, one failure
    assert gate.observe(OK) == (S.UP, "check passed")  # first pass: UP at once
    assert gate.observe(BAD) is None
    assert gate.observe(OK) is None  # the failure streak is broken
    assert gate.observe(BAD) is None
    assert gate.observe(BAD) == (S.DOWN, "check failed: HTTP 503")
    assert gate.observe(BAD) is None  # already DOWN: no repeat
    assert gate.observe(OK) is None  # needs 2 passes to come back
    assert gate.observe(BAD) is None
    assert gate.observe(OK) is None
    assert gate.observe(OK) == (S.UP, "check passed")


def test_a_service_that_never_starts_goes_down() -> None:
    gate = CheckGate(failures=3, successes=1)
    assert [gate.observe(BAD) for _ in range(3)][-1] == (S.DOWN, "check failed: HTTP 503")


def test_flapping_every_other_check_never_goes_down_with_two_failures() -> None:
    gate = CheckGate(failures=2, successes=1)
    changes = [gate.observe(r) for r in [OK, BAD] * 10]
    assert [c for c in changes if c] == [(S.UP, "check passed")]


@pytest.mark.parametrize(
    ("target", "command", "message"),
    [
        ("ftp://x", None, "use http://..., https://... or tcp://host:port"),
        ("tcp://host", None, "must look like tcp://host:port"),
        ("tcp://host:99999", None, "must look like tcp://host:port"),
        ("http://x", "true", "not both"),
    ],
)
def test_bad_check_options_say_what_is_wrong(
    target: str, command: str | None, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_check(target, command)


@pytest.mark.parametrize(
    ("timing", "message"),
    [
        ({"interval": 1.0, "timeout": 2.0}, "must not exceed its interval"),
        ({"interval": 0.0}, "must be positive"),
        ({"failures": 0}, "≥ 1"),
    ],
)
def test_bad_timings_are_refused(timing: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TcpCheck("127.0.0.1", 1, **timing)  # type: ignore[arg-type]


def test_parse_check_builds_each_kind() -> None:
    assert parse_check(None) is None
    assert isinstance(parse_check("https://h/x"), HttpCheck)
    assert parse_check("tcp://[::1]:80") == TcpCheck("::1", 80)
    assert parse_check(None, "exit 0") == CommandCheck("exit 0")


async def test_http_check_answers_healthy_503_timeout_and_refused() -> None:
    async with HealthServer() as server:
        check = HttpCheck(server.url, interval=1.0, timeout=0.2)
        assert await check.probe() == CheckResult(True, "HTTP 200")
        server.mode = "503"
        assert await check.probe() == CheckResult(False, "HTTP 503")
        server.mode = "hang"
        assert await check.probe() == CheckResult(False, "timeout after 0.2s")
        await server.kill()
        result = await check.probe()
    assert not result.ok
    assert result.detail  # httpx's "All connection attempts failed", or the OS's words


async def test_tcp_check_open_and_closed_port() -> None:
    async with HealthServer() as server:
        assert (await TcpCheck("127.0.0.1", server.port).probe()).ok
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await TcpCheck("127.0.0.1", port).probe()
    assert not result.ok
    assert "refused" in result.detail.lower()


async def test_command_check_exit_status_stderr_and_timeout() -> None:
    assert await CommandCheck("exit 0").probe() == CheckResult(True, "exit 0")
    failed = await CommandCheck("echo 'db unreachable' >&2; exit 3").probe()
    assert failed == CheckResult(False, "exit 3: db unreachable")
    slow = await CommandCheck("sleep 5", interval=1.0, timeout=0.2).probe()
    assert slow == CheckResult(False, "timeout after 0.2s")
