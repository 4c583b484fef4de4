"""Input ``busreg register`` must refuse (issue 15, section 4): one clear line, exit 1, and
nothing connected (these run with no server at all). ``Registry.register`` runs the same
checks (``checked_registration``), so the library refuses the same things the same way."""

from __future__ import annotations

import pytest

from busreg import Settings
from busreg.client.registration import checked_registration
from busreg.errors import ConfigurationError
from busreg.ops.cli import main

ADDR = ["--address", "127.0.0.1:8080"]
#: a URL nothing listens on: a check that tried to connect would fail differently
OFFLINE = ["--amqp-url", "amqp://guest:guest@127.0.0.1:1/"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "bad_addr"], "address: 'bad_addr' is not valid: use host:port"),
        ([*ADDR, "--instance-id", "bad!id"], "instance_id: 'bad!id' is not valid: use letters"),
        (["--address", "127.0.0.1:8080", "--zone", "a b"], "zone: 'a b' is not valid"),
        ([*ADDR, "--ttl", "-1"], "ttl: Input should be greater than 0"),
        ([*ADDR, "--ttl", "nan"], "ttl: Input should be a finite number"),
        ([*ADDR, "--interval", "0"], "interval: Input should be greater than 0"),
        ([*ADDR, "--interval", "-2"], "interval: Input should be greater than 0"),
        ([*ADDR, "--ttl", "60", "--interval", "35"], "interval: Input should be less than or"),
        ([*ADDR, "--interval", "5"], "the heartbeat interval (5.0s) must be below the ttl (3.0s)"),
        ([*ADDR, "--check", "ftp://x"], "use http://..., https://... or tcp://host:port"),
        ([*ADDR, "--check", "tcp://h:1", "--check-cmd", "true"], "not both"),
        ([*ADDR, "--check", "tcp://h:1", "--check-timeout", "9"], "must not exceed its interval"),
    ],
)
def test_register_refuses_bad_input_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*OFFLINE, "register", "inventory", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("busreg: error: ")
    assert message in err[0]


def test_a_bad_service_name_says_which_characters_are_allowed() -> None:
    with pytest.raises(ConfigurationError) as info:
        checked_registration(
            Settings(), "bad name", address="127.0.0.1:1", instance_id=None, zone="default",
            status="UP", metadata=None, ttl=None, interval=None,
        )  # fmt: skip
    assert "service: 'bad name' is not valid: use letters, digits" in str(info.value)
    assert "pattern" not in str(info.value)


def test_the_default_instance_id_of_an_ipv6_address_is_valid() -> None:
    iid, ttl, interval = checked_registration(
        Settings(), "inventory", address="[::1]:8080", instance_id=None, zone="default",
        status="UP", metadata=None, ttl=None, interval=None,
    )  # fmt: skip
    assert iid.endswith("-_::1_:8080")  # brackets are not allowed in an id
    assert (ttl, interval) == (3.0, 1.0)
