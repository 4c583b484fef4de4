"""A fault-injecting TCP proxy for tests (asyncio, stdlib only).

Put it between a client and a real server to make the network misbehave on demand, the way
aio-pika's test suite does with its TCP proxy::

    async with FaultProxy("127.0.0.1", 6379) as proxy:
        redis = Redis(host="127.0.0.1", port=proxy.port)
        proxy.drop_next_reply()      # the next command runs, but its reply is lost
        ...

Why a proxy rather than stopping servers: stopping a server tests only "everything is gone".
The failures that break clients are subtler -- a slow link, a half-open connection that
swallows bytes, a reset in the middle of a session, and above all a command that *ran* on
the server whose reply never arrived (so a blind retry runs it twice). A proxy produces each
of them deterministically, per test, without touching the shared servers.

Faults are switched at run time and apply to connections already open as well as new ones.
Everything the proxy starts is a tracked task; leaving the ``async with`` block stops the
listener, resets every connection and waits for every task, so a test leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

__all__ = ["CHAOS_KINDS", "Direction", "FaultKind", "FaultProxy", "ProxyStats"]

#: ``"up"`` is client -> server, ``"down"`` is server -> client
Direction = Literal["both", "up", "down"]
#: the faults :meth:`FaultProxy.chaos` can pick from
FaultKind = Literal["delay", "stall", "reset", "refuse", "drop"]
CHAOS_KINDS: tuple[FaultKind, ...] = ("delay", "stall", "reset", "refuse", "drop")

_CHUNK = 64 * 1024
# SO_LINGER on, timeout 0: close() then sends RST instead of FIN. asyncio's
# transport.abort() alone only discards the write buffer and closes (a FIN), which a client
# reads as an orderly EOF -- not the "connection reset" a crashed peer or middlebox produces.
_LINGER_RST = struct.pack("ii", 1, 0)


def _directions(direction: Direction) -> tuple[Literal["up", "down"], ...]:
    if direction == "both":
        return ("up", "down")
    if direction in ("up", "down"):
        return (direction,)
    raise ValueError(f"direction must be 'both', 'up' or 'down', not {direction!r}")


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Abort a connection so the peer sees a TCP reset (ECONNRESET), not an EOF."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already dead: abort() below still cleans up
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


@dataclass
class ProxyStats:
    """Counters a soak test reports, so "it passed" also says how much chaos it survived.

    ``faults`` counts faults that *took effect*, by kind: ``delay`` and ``stall`` per call
    that switched them on, ``reset`` per connection aborted (by :meth:`FaultProxy.reset_all`
    or after a dropped reply), ``refuse`` per connection refused, ``drop`` per chunk
    discarded."""

    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    #: the last faults as (monotonic time, kind, detail), for a soak test's failure report
    log: deque[tuple[float, str, str]] = field(default_factory=lambda: deque(maxlen=200))

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    def record(self, kind: str, detail: str = "", n: int = 1) -> None:
        if n <= 0:
            return
        self.faults[kind] += n
        self.log.append((time.monotonic(), kind, detail))

    def as_dict(self) -> dict[str, Any]:
        """A plain snapshot for printing or JSON reports."""
        return {
            "connections": self.connections,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "faults_injected": self.faults_injected,
            "faults": dict(self.faults),
        }


class _Connection:
    """One proxied client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        #: set = flowing; cleared for a connection accepted under stall_new_connections()
        self.flowing = asyncio.Event()
        self.flowing.set()

    def abort(self) -> None:
        """Reset both sides and stop the pumps (which may be held by a stall)."""
        _abort_with_rst(self.client)
        if self.upstream is not None:
            _abort_with_rst(self.upstream)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class FaultProxy:
    """TCP proxy from ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` with faults.

    Use as an async context manager; :attr:`port` is the listening port. With no fault
    switched on it forwards bytes unchanged in both directions, half-closes included.
    All fault methods are synchronous and take effect at once, so a test can flip them
    between two awaits without racing the proxy."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        self._connections: set[_Connection] = set()
        self._delay: dict[str, float] = {"up": 0.0, "down": 0.0}
        # set = flowing; a pump holds its chunk while its direction's event is clear
        self._flowing: dict[str, asyncio.Event] = {"up": asyncio.Event(), "down": asyncio.Event()}
        for event in self._flowing.values():
            event.set()
        self._refusing = False
        self._drop_budget = 0
        self._dropped_on: set[_Connection] = set()
        self._hold_new = 0
        self._held: set[_Connection] = set()

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
        if self._errors:
            group = BaseExceptionGroup("FaultProxy task(s) failed", list(self._errors))
            if exc is None:
                raise group
            # don't mask the test's own failure; still say the proxy misbehaved
            exc.add_note(f"also: {group!r}: {self._errors!r}")

    async def aclose(self) -> None:
        """Stop listening, reset every connection, cancel and await every task (idempotent).

        Cancellation of the caller is not swallowed: if the caller is cancelled while
        waiting, the CancelledError propagates (the tasks have been cancelled already)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        for event in self._flowing.values():
            event.set()  # nothing may stay held
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started: use `async with FaultProxy(...)`")
        return self._port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def url_for(self, url: str) -> str:
        """``url`` (e.g. ``redis://user:pw@127.0.0.1:6379/15``) pointed at this proxy.

        Scheme, credentials, path and query stay; only host and port change. Note that TLS
        verification by host name will no longer match: the proxy is for plain TCP."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        netloc += f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- faults -----------------------------------------------------------------------

    def delay(self, seconds: float, direction: Direction = "both") -> None:
        """Add ``seconds`` of latency before each forwarded chunk in ``direction``.

        Chunks in one direction stay in order and are delayed one after another, like a
        slow link: a request/reply round trip through ``"both"`` takes at least
        ``2 * seconds``. ``delay(0)`` removes the latency."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        for d in _directions(direction):
            self._delay[d] = seconds
        if seconds > 0:
            self.stats.record("delay", f"{seconds:.3f}s {direction}")

    def stall(self, direction: Direction = "both") -> None:
        """Stop forwarding in ``direction``: bytes are held (not lost) until :meth:`resume`.

        The connection stays open and silent -- a hung server or a black-holed route --
        so a client notices only through its own timeouts. While held, the proxy stops
        reading that side, so TCP flow control pushes back on the sender."""
        for d in _directions(direction):
            self._flowing[d].clear()
        self.stats.record("stall", direction)

    def stall_new_connections(self, count: int = 1) -> None:
        """Hold the next ``count`` connections accepted from now on, in both directions,
        until :meth:`resume`; connections already open keep flowing.

        One client among many hangs (a connect or a request on a fresh connection that
        gets no answer) while the rest of its traffic goes through: what a per-connection
        fault looks like, e.g. one partition's new stream connection of a worker."""
        if count < 1:
            raise ValueError("count must be >= 1")
        self._hold_new += count

    def resume(self) -> None:
        """Release every stall; held bytes are forwarded (to whoever is still listening)."""
        for event in self._flowing.values():
            event.set()
        for conn in self._held:
            conn.flowing.set()
        self._held.clear()
        self._hold_new = 0

    def reset_all(self) -> int:
        """Abort every open connection with a TCP reset, both to client and to upstream.

        New connections are still accepted. Returns the number of connections reset. The
        RST goes out on the next event loop iteration, so by the client's next read or
        write on that socket it sees ECONNRESET."""
        conns = list(self._connections)
        for conn in conns:
            self._reset(conn, "reset_all")
        return len(conns)

    def refuse(self, on: bool = True) -> None:
        """While on, each new connection is reset right after it is accepted.

        (A listening socket cannot refuse a SYN from user space; an immediate reset is what
        a client sees from a server that dies on accept or a firewall rejecting it.)
        Connections already open are not affected: combine with :meth:`reset_all`."""
        self._refusing = on

    def drop_next_reply(self, count: int = 1) -> None:
        """Discard the next ``count`` chunks going DOWN (server -> client), then reset.

        Requests still reach the server and run there; only the answers are lost, and the
        connection(s) that lost them are then reset so the client fails fast instead of
        waiting for a timeout. This is "the command ran but its reply was lost": the case
        where retrying a non-idempotent command (INCR, XADD, a Lua script) applies it twice.

        Granularity is one read from the upstream socket, not one protocol message. For
        Redis that is one reply in practice (replies are small and written at once), but a
        large reply may span chunks and pipelined replies may share one. Arm it only after
        the client's handshake (SELECT, HELLO, AUTH) has completed, or the handshake's reply
        is what gets dropped. The budget is proxy-wide: the next chunks on any connection."""
        if count < 1:
            raise ValueError("count must be >= 1")
        self._drop_budget += count

    def clear(self) -> None:
        """Back to plain forwarding: no delay, no stall, no refusing, no pending drops."""
        for d in self._delay:
            self._delay[d] = 0.0
        self._refusing = False
        self._drop_budget = 0
        self._dropped_on.clear()
        self.resume()

    def chaos(
        self,
        seed: int,
        rate: float,
        kinds: Iterable[FaultKind] = CHAOS_KINDS,
        *,
        max_delay: float = 0.1,
        max_hold: float = 0.5,
        max_faults: int | None = 100,
        duration: float | None = None,
    ) -> asyncio.Task[None]:
        """Inject random faults in the background, for soak tests.

        On average ``rate`` faults per second (exponential gaps), each of a kind drawn from
        ``kinds``; ``delay`` uses up to ``max_delay`` seconds; ``delay``, ``stall`` and
        ``refuse`` last up to ``max_hold`` seconds and are then switched off again;
        ``reset`` and ``drop`` are instantaneous. The sequence of choices depends only on
        ``seed``, so a failing soak run can be repeated (traffic timing still varies).

        It stops after ``max_faults`` faults or ``duration`` seconds (at least one bound is
        required, so a forgotten chaos task cannot run forever), or when the proxy closes,
        and then calls :meth:`clear`. Returns the task: await it to wait for the end.
        Its exceptions (a bug here) are raised when the proxy closes."""
        kinds = tuple(kinds)
        if not kinds or any(k not in CHAOS_KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {CHAOS_KINDS}")
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if max_faults is None and duration is None:
            raise ValueError("give max_faults or duration (or both)")
        return self._spawn(
            self._chaos(
                random.Random(seed), rate, kinds, max_delay, max_hold, max_faults, duration
            ),
            name=f"faultproxy-chaos-{seed}",
        )

    # -- internals --------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._closing:
            coro.close()
            raise RuntimeError("FaultProxy is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # a bug in the proxy: raised when the proxy closes
            self._errors.append(error)

    def _reset(self, conn: _Connection, why: str) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self.stats.record("reset", why)
        conn.abort()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine: asyncio would otherwise wrap it in a task of
        # its own that we could not track. The connection's work runs in our task.
        self.stats.connections += 1
        if self._closing:
            _abort_with_rst(writer)
            return
        if self._refusing:
            _abort_with_rst(writer)
            self.stats.record("refuse", f"connection {self.stats.connections}")
            return
        conn = _Connection(writer)
        if self._hold_new > 0:
            self._hold_new -= 1
            conn.flowing.clear()
            self._held.add(conn)
            self.stats.record("stall", f"new connection {self.stats.connections}")
        conn.task = self._spawn(
            self._serve(conn, reader), name=f"faultproxy-conn-{self.stats.connections}"
        )
        self._connections.add(conn)

    async def _serve(self, conn: _Connection, client_reader: asyncio.StreamReader) -> None:
        orderly = False
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                return  # upstream down: the client is reset, as by a dead server path
            conn.upstream = up_writer
            if conn not in self._connections:  # reset while we were connecting
                return
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(conn, client_reader, up_writer, "up"))
                tg.create_task(self._pump(conn, up_reader, conn.client, "down"))
            # both directions ended with an EOF (or one side was reset)
            orderly = True
            conn.client.close()
            up_writer.close()
        finally:
            self._connections.discard(conn)
            self._dropped_on.discard(conn)
            self._held.discard(conn)
            if not orderly:  # cancelled, upstream unreachable, or a bug: no open sockets
                conn.abort()

    async def _pump(
        self,
        conn: _Connection,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        """Copy ``src`` to ``dst`` chunk by chunk, applying the faults of ``direction``."""
        flowing = self._flowing[direction]
        try:
            while True:
                data = await src.read(_CHUNK)
                if not data:
                    if not dst.transport.is_closing() and dst.can_write_eof():
                        dst.write_eof()  # pass the half-close on
                    return
                latency = self._delay[direction]
                if latency > 0:
                    await asyncio.sleep(latency)  # the injected latency itself
                while not (flowing.is_set() and conn.flowing.is_set()):
                    await flowing.wait()
                    await conn.flowing.wait()
                if direction == "down" and self._drop_budget > 0:
                    self._drop_budget -= 1
                    self.stats.record("drop", f"{len(data)} bytes")
                    self._dropped_on.add(conn)
                    if self._drop_budget == 0:
                        victims = list(self._dropped_on)
                        self._dropped_on.clear()
                        for victim in victims:
                            self._reset(victim, "after dropped reply")
                        if conn in victims:
                            return
                    continue
                dst.write(data)
                await dst.drain()
                if direction == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
        except OSError:
            # one side went away (reset, broken pipe): a real middlebox drops both
            conn.abort()
            self._connections.discard(conn)

    async def _chaos(
        self,
        rng: random.Random,
        rate: float,
        kinds: tuple[FaultKind, ...],
        max_delay: float,
        max_hold: float,
        max_faults: int | None,
        duration: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if duration is None else loop.time() + duration
        injected = 0
        try:
            while max_faults is None or injected < max_faults:
                gap = rng.expovariate(rate)
                if deadline is not None:
                    gap = min(gap, max(0.0, deadline - loop.time()))
                await asyncio.sleep(gap)  # the schedule of faults, not synchronisation
                if deadline is not None and loop.time() >= deadline:
                    return
                kind = rng.choice(kinds)
                hold = rng.uniform(0.0, max_hold)
                injected += 1
                if kind == "reset":
                    self.reset_all()
                elif kind == "drop":
                    self.drop_next_reply()
                elif kind == "delay":
                    self.delay(rng.uniform(0.0, max_delay), rng.choice(("both", "up", "down")))
                    await asyncio.sleep(hold)
                    self.delay(0)
                elif kind == "stall":
                    self.stall(rng.choice(("both", "up", "down")))
                    await asyncio.sleep(hold)
                    self.resume()
                elif kind == "refuse":
                    self.refuse(True)
                    self.stats.log.append((time.monotonic(), "refuse-on", f"{hold:.3f}s"))
                    await asyncio.sleep(hold)
                    self.refuse(False)
        finally:
            self.clear()
