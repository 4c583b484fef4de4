"""busreg.transport.connections: the hiredis command packer sends what redis-py would."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_exc
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

from busreg.transport.connections import _with_hiredis_packing

ARG = st.one_of(
    st.text(max_size=50),
    st.binary(max_size=50),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(
    name=st.sampled_from(["EVALSHA", "CONFIG GET", b"HSET", b"CLIENT SETNAME"]),
    args=st.lists(ARG, max_size=30),
)
def test_packs_byte_for_byte_like_redis_py(name: str | bytes, args: list[object]) -> None:
    plain = Connection()
    fast = _with_hiredis_packing(Connection)()
    assert b"".join(fast.pack_command(name, *args)) == b"".join(plain.pack_command(name, *args))


def test_an_apply_sized_command_packs_the_same() -> None:
    args: list[object] = ["EVALSHA", "f" * 40, 1, "busreg:{ns.3}:", "tok/1", 1000]
    for i in range(1000):
        args += [i, 1764150000123, "U", "svc", f"i-{i}", "0" * 36, 3000, '{"address":"h:1"}']
    fast = _with_hiredis_packing(Connection)()
    assert b"".join(fast.pack_command(*args)) == b"".join(Connection().pack_command(*args))


def test_unsupported_argument_is_a_data_error() -> None:
    with pytest.raises(redis_exc.DataError):
        _with_hiredis_packing(Connection)().pack_command("SET", "k", object())


@pytest.mark.parametrize("cls", [Connection, SSLConnection, UnixDomainSocketConnection])
def test_every_connection_kind_keeps_its_class(cls: type[Connection]) -> None:
    fast = _with_hiredis_packing(cls)
    assert issubclass(fast, cls)
    assert _with_hiredis_packing(cls) is fast  # made once


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("redis://127.0.0.1:1/0", Connection),
        ("rediss://127.0.0.1:1/0", SSLConnection),
        ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
    ],
)
def test_from_url_classes_are_the_ones_wrapped(url: str, cls: type[Connection]) -> None:
    # connect_redis wraps whatever class from_url chose for the scheme
    assert aioredis.Redis.from_url(url).connection_pool.connection_class is cls
