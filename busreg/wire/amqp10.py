"""A bounds check of AMQP 1.0 encoded messages, run before rstream's decoder sees one.

Why: ingest partitions are written by anyone with publish rights, and an AMQP-looking body
reaches ``rstream.amqp_decoder``, which trusts declared element counts. A 30-byte message
that declares a list of 2.6 billion elements makes it allocate ``[None] * count`` (20 GB)
before it notices the bytes are missing; an array of zero-width elements (nulls) with a huge
count loops without ever running out of input. Either stalls a partition (invariant 6).

``check_message`` walks the encoding without building values: every size must fit in what
is left of its enclosing value, every compound or array may declare at most as many
elements as it has bytes, and nesting is bounded. A message that passes can be decoded in
time and memory proportional to its length. Pure; no I/O. Type codes are from the AMQP 1.0
specification, part 1.6 (types encoding).
"""

from __future__ import annotations

__all__ = ["MalformedAmqp", "check_message"]

#: Nesting depth refused beyond this (rstream decodes recursively; RabbitMQ-produced
#: messages nest properties -> map -> list -> map at most a handful of levels).
MAX_DEPTH = 32

# constructor code -> width in bytes of a fixed-width value
_FIXED = {
    **dict.fromkeys((0x40, 0x41, 0x42, 0x43, 0x44, 0x45), 0),  # null, true, false, *0, list0
    **dict.fromkeys(range(0x50, 0x57), 1),  # ubyte .. boolean
    **dict.fromkeys((0x60, 0x61), 2),  # ushort, short
    **dict.fromkeys(range(0x70, 0x75), 4),  # uint .. decimal32
    **dict.fromkeys(range(0x80, 0x85), 8),  # ulong .. decimal64
    0x94: 16,  # decimal128
    0x98: 16,  # uuid
}
# variable width (binary, string, symbol): width of the size prefix
_VARIABLE = {0xA0: 1, 0xA1: 1, 0xA3: 1, 0xB0: 4, 0xB1: 4, 0xB3: 4}
# compounds (list, map) and arrays: width of the size and of the count fields
_COMPOUND = {0xC0: 1, 0xC1: 1, 0xD0: 4, 0xD1: 4}
_ARRAY = {0xE0: 1, 0xF0: 4}
_DESCRIBED = 0x00
#: section descriptors (small ulong 0x53 <code>): header .. footer
_SECTIONS = range(0x70, 0x79)


class MalformedAmqp(ValueError):
    """The bytes are not a well-formed AMQP 1.0 message."""


def _uint(buf: bytes, pos: int, width: int, end: int) -> int:
    if pos + width > end:
        raise MalformedAmqp(f"truncated at byte {pos}")
    return int.from_bytes(buf[pos : pos + width], "big")


def _sized(buf: bytes, pos: int, end: int, width: int, what: str) -> tuple[int, int, int]:
    """Read the size and count fields (``width`` bytes each) of a compound or an array at
    ``pos``; return (position after them, end of the value, count), checked to fit."""
    size = _uint(buf, pos, width, end)
    pos += width
    stop = pos + size
    if stop > end:
        raise MalformedAmqp(f"{what} of {size} bytes overruns at byte {pos}")
    count = _uint(buf, pos, width, stop)
    pos += width
    if count > stop - pos:
        raise MalformedAmqp(f"{what} declares {count} elements in {stop - pos} bytes")
    return pos, stop, count


def _value(buf: bytes, pos: int, end: int, depth: int, code: int | None = None) -> int:
    """Check one encoded value starting at ``pos`` (its constructor there, unless ``code``
    is given: an array element) and return the position after it."""
    if depth > MAX_DEPTH:
        raise MalformedAmqp(f"nested deeper than {MAX_DEPTH}")
    if code is None:
        code = _uint(buf, pos, 1, end)
        pos += 1
        if code == _DESCRIBED:
            pos = _value(buf, pos, end, depth + 1)  # the descriptor
            return _value(buf, pos, end, depth + 1)
    if (width := _FIXED.get(code)) is not None:
        if pos + width > end:
            raise MalformedAmqp(f"truncated value of type 0x{code:02x} at byte {pos}")
        return pos + width
    if (width := _VARIABLE.get(code)) is not None:
        size = _uint(buf, pos, width, end)
        pos += width
        if pos + size > end:
            raise MalformedAmqp(f"0x{code:02x} of {size} bytes overruns at byte {pos}")
        return pos + size
    if (width := _COMPOUND.get(code)) is not None:
        pos, stop, count = _sized(buf, pos, end, width, "compound")
        for _ in range(count):
            pos = _value(buf, pos, stop, depth + 1)
        return stop
    if (width := _ARRAY.get(code)) is not None:
        pos, stop, count = _sized(buf, pos, end, width, "array")
        if count:
            element = _uint(buf, pos, 1, stop)
            pos += 1
            if element == _DESCRIBED:
                pos = _value(buf, pos, stop, depth + 1)
                element = _uint(buf, pos, 1, stop)
                pos += 1
            for _ in range(count):
                pos = _value(buf, pos, stop, depth + 1, element)
        return stop
    raise MalformedAmqp(f"unknown type constructor 0x{code:02x} at byte {pos - 1}")


def check_message(buf: bytes) -> None:
    """Raise MalformedAmqp unless ``buf`` is a sequence of well-formed AMQP 1.0 message
    sections (each ``0x00 0x53 <0x70..0x78>`` and one value)."""
    pos, end = 0, len(buf)
    if not end:
        raise MalformedAmqp("empty message")
    while pos < end:
        if buf[pos : pos + 2] != b"\x00\x53" or pos + 2 >= end or buf[pos + 2] not in _SECTIONS:
            raise MalformedAmqp(f"no message section at byte {pos}")
        pos = _value(buf, pos + 3, end, 1)
