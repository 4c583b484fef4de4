"""RetryPolicy, CallState, RetryBudget, and the httpx transport over a fake view (no servers)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from busreg.callers.balancer import InstanceSource, NoInstanceAvailable, RoundRobin, ZoneAware
from busreg.callers.http_client import BusregTransport, DeadlineExceeded, async_client
from busreg.callers.retry import (
    IDEMPOTENCY_HEADER,
    CallState,
    Decision,
    Failure,
    RetryBudget,
    RetryPolicy,
)
from busreg.errors import ConfigurationError
from busreg.wire.models import Instance, InstanceStatus

# --- RetryPolicy -------------------------------------------------------------------------------


def test_worst_case_is_the_seeds_formula() -> None:
    p = RetryPolicy(connect=1.0, read=1.0, max_auto_retries=0, max_auto_retries_next_server=1)
    assert p.worst_case() == (1 + 1) * (0 + 1) * (1 + 1) == 4.0
    p = RetryPolicy(connect=0.25, read=3.0, max_auto_retries=1, max_auto_retries_next_server=2)
    assert p.max_attempts == 6
    assert p.worst_case() == pytest.approx(3.25 * 2 * 3)
    assert (p.connect_timeout, p.read_timeout) == (0.25, 3.0)


def test_deadline_shorter_than_the_worst_case_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError) as err:
        RetryPolicy(
            connect=1.0, read=1.0, max_auto_retries=1, max_auto_retries_next_server=1, deadline=7.9
        )
    message = str(err.value)
    assert "deadline 7.9s is shorter than the worst case 8s" in message
    assert "(connect 1 + read 1) * (max_auto_retries 1 + 1)" in message
    ok = RetryPolicy(connect=1.0, read=1.0, max_auto_retries=1, deadline=8.0)
    assert ok.deadline == 8.0
    RetryPolicy(connect=1.0, read=1.0, max_auto_retries=1, deadline=30.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connect": 0},
        {"read": -1},
        {"read": float("inf")},
        {"max_auto_retries": -1},
        {"max_auto_retries_next_server": 1.5},
        {"max_auto_retries": True},
        {"retryable_statuses": frozenset({999})},
        {"deadline": 0},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_which_methods_may_be_retried() -> None:
    p = RetryPolicy()
    for method in ("GET", "head", "OPTIONS", "PUT", "DELETE"):
        assert p.may_retry(method)
        assert not p.needs_idempotency_key(method)
    for method in ("POST", "PATCH"):
        assert not p.may_retry(method)
    every = RetryPolicy(ok_to_retry_on_all_operations=True)
    assert every.may_retry("POST")
    assert every.needs_idempotency_key("POST")
    assert every.needs_idempotency_key("patch")
    assert not every.needs_idempotency_key("PUT")


# --- CallState -------------------------------------------------------------------------------


def run_out(state: CallState, failure: Failure) -> list[Decision]:
    decisions = []
    while True:
        decision = state.decide(failure)
        decisions.append(decision)
        if decision is Decision.GIVE_UP:
            return decisions
        state.advance(decision)


def test_read_failures_of_an_idempotent_call_use_every_attempt() -> None:
    p = RetryPolicy(max_auto_retries=1, max_auto_retries_next_server=2)
    state = CallState(p, "GET")
    S, N, G = Decision.SAME_SERVER, Decision.NEXT_SERVER, Decision.GIVE_UP
    assert run_out(state, Failure.READ) == [S, N, S, N, S, G]
    assert state.attempts == p.max_attempts == 6


def test_connect_failures_go_to_the_next_server_for_every_method() -> None:
    p = RetryPolicy(max_auto_retries=1, max_auto_retries_next_server=1)
    state = CallState(p, "POST")
    assert run_out(state, Failure.CONNECT) == [
        Decision.NEXT_SERVER,
        Decision.SAME_SERVER,
        Decision.GIVE_UP,
    ]


def test_non_idempotent_calls_are_not_retried_after_a_read_failure_or_status() -> None:
    p = RetryPolicy(max_auto_retries=2, max_auto_retries_next_server=2)
    for failure in (Failure.READ, Failure.STATUS):
        assert CallState(p, "POST").decide(failure) is Decision.GIVE_UP
        assert CallState(p, "PATCH").decide(failure) is Decision.GIVE_UP
    assert CallState(p, "POST", replayable=False).decide(Failure.CONNECT) is Decision.NEXT_SERVER
    assert CallState(p, "GET", replayable=False).decide(Failure.READ) is Decision.GIVE_UP
    every = RetryPolicy(ok_to_retry_on_all_operations=True, max_auto_retries_next_server=1)
    assert CallState(every, "POST").decide(Failure.STATUS) is Decision.NEXT_SERVER


def test_idempotency_key_is_made_once_per_call_or_kept_from_the_caller() -> None:
    every = RetryPolicy(ok_to_retry_on_all_operations=True)
    a, b = CallState(every, "POST"), CallState(every, "POST")
    assert a.idempotency_key
    assert b.idempotency_key
    assert a.idempotency_key != b.idempotency_key
    key = a.idempotency_key
    run_out(a, Failure.READ)
    assert a.idempotency_key == key, "stable across the retries of one call"
    assert CallState(every, "GET").idempotency_key is None
    assert CallState(RetryPolicy(), "POST").idempotency_key is None
    given = CallState(every, "POST", {"idempotency-key": "order-42"})
    assert given.idempotency_key == "order-42"


# --- RetryBudget -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_caps_retries_when_every_attempt_fails() -> None:
    """100 calls/s for 60 s against a dependency that always fails; each call would retry 3
    times. Without a budget: 18,000 retries (4x the load). With it: 20% + 10/s."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=10, window=10.0, clock=clock)
    retries_per_window: Counter[int] = Counter()
    wanted = 0
    for n in range(6000):
        clock.now = n / 100
        budget.deposit()
        for _ in range(3):
            wanted += 1
            if not budget.try_withdraw():
                break
            retries_per_window[int(clock.now // 10)] += 1
    print(f"\nretry budget, 100% failures: {budget.retries} retries of {wanted} wanted")
    assert wanted - budget.retries == budget.denied
    # the first window may also spend the reserve; every window stays within its budget
    for window, retries in retries_per_window.items():
        assert retries <= 0.2 * 1000 + 10 * 10 + 1, (window, retries)
    assert budget.retries <= 6 * (0.2 * 1000 + 10 * 10)
    assert budget.retries / budget.requests < 0.31  # vs 3.0 without a budget


def test_budget_recovers_and_the_reserve_lets_a_quiet_client_retry() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=1, window=10.0, clock=clock)
    allowed = sum(budget.try_withdraw() for _ in range(50))
    assert allowed == 10  # the reserve: min_per_second * window
    assert not budget.try_withdraw()
    clock.now = 10.0  # the window slid past those retries
    assert budget.try_withdraw()
    for _ in range(100):
        budget.deposit()
    assert budget.balance == pytest.approx(10 + 20 - 1)


def test_budgets_stop_retries_multiplying_across_layers() -> None:
    """gateway -> cart -> inventory, inventory always failing, each layer retrying up to 3
    times: without budgets inventory sees 4 * 4 = 16x the calls; with one budget per layer
    it sees about 1.2 * 1.2x (plus the small reserves)."""
    clock = FakeClock()
    cart_budget = RetryBudget(ratio=0.2, min_per_second=1, window=10.0, clock=clock)
    gw_budget = RetryBudget(ratio=0.2, min_per_second=1, window=10.0, clock=clock)
    inventory_calls = 0

    def cart_call() -> bool:
        nonlocal inventory_calls
        cart_budget.deposit()
        inventory_calls += 1
        for _ in range(3):
            if not cart_budget.try_withdraw():
                break
            inventory_calls += 1
        return False  # inventory failed every time

    gateway_calls = 0
    for n in range(10_000):
        clock.now = n / 100
        gateway_calls += 1
        gw_budget.deposit()
        cart_call()
        for _ in range(3):
            if not gw_budget.try_withdraw():
                break
            cart_call()
    amplification = inventory_calls / gateway_calls
    print(
        f"\nstacked retries: inventory saw {amplification:.2f}x the gateway's calls (16x without)"
    )
    assert amplification < 1.2 * 1.2 * 1.1


def test_budget_validation() -> None:
    with pytest.raises(ConfigurationError):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ConfigurationError):
        RetryBudget(window=0)
    unlimited = RetryBudget.unlimited()
    assert all(unlimited.try_withdraw() for _ in range(10_000))


# --- the httpx transport over a fake view ------------------------------------------------------


class FakeView:
    def __init__(self, service: str, *instances: Instance) -> None:
        self.service = service
        self.instances: dict[str, Instance] = {i.instance_id: i for i in instances}


class FakeRegistry:
    def __init__(self, *views: FakeView) -> None:
        self.views = {v.service: v for v in views}
        self.watched: list[str] = []

    async def watch(self, service: str) -> InstanceSource:
        self.watched.append(service)
        await asyncio.sleep(0)
        return self.views.setdefault(service, FakeView(service))


def instance(iid: str, port: int, zone: str = "default") -> Instance:
    return Instance(
        service="inventory",
        instance_id=iid,
        incarnation=1,
        address=f"10.0.0.1:{port}",
        zone=zone,
        status=InstanceStatus.UP,
    )


Handler = Callable[[httpx.Request], httpx.Response]


def inventory(*ports: int) -> FakeRegistry:
    return FakeRegistry(FakeView("inventory", *(instance(f"i{p}", p) for p in ports)))


async def client_for(
    registry: FakeRegistry, handler: Handler, **kwargs: object
) -> tuple[httpx.AsyncClient, BusregTransport]:
    client = await async_client(
        registry,
        services=["inventory"],
        inner=httpx.MockTransport(handler),
        **kwargs,  # type: ignore[arg-type]
    )
    transport = client._transport
    assert isinstance(transport, BusregTransport)
    return client, transport


async def test_idempotency_key_is_identical_on_every_retry_of_a_write() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) < 3 else 201, json={"port": request.url.port})

    policy = RetryPolicy(
        ok_to_retry_on_all_operations=True, max_auto_retries=1, max_auto_retries_next_server=1
    )
    client, transport = await client_for(inventory(1, 2), handler, policy=policy)
    async with client:
        response = await client.post("http://inventory/orders", json={"sku": "A-1", "qty": 2})
        await client.post("http://inventory/orders", json={"sku": "A-1", "qty": 2})
    assert response.status_code == 201
    assert response.extensions["busreg.attempts"] == 3
    keys = [r.headers[IDEMPOTENCY_HEADER] for r in seen[:3]]
    assert len(set(keys)) == 1, keys
    assert len(keys[0]) == 32
    assert seen[3].headers[IDEMPOTENCY_HEADER] != keys[0], "a new call gets a new key"
    assert [r.content for r in seen[:3]] == [seen[0].content] * 3, "same body every attempt"
    assert all(r.headers["host"] == "inventory" for r in seen)
    assert [r.url.port for r in seen[:3]] == [1, 1, 2], "same server once, then the next"
    assert transport.stats.status_retries == 2


async def test_posts_are_not_retried_unless_the_policy_says_so() -> None:
    calls: list[int | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.port)
        return httpx.Response(503)

    client, _ = await client_for(inventory(1, 2), handler)
    async with client:
        response = await client.post("http://inventory/orders", content=b"x")
        assert response.status_code == 503
        assert IDEMPOTENCY_HEADER not in response.request.headers
        assert len(calls) == 1
        response = await client.get("http://inventory/items/1")
        assert response.status_code == 503  # retried once on the next server, then returned
    assert len(calls) == 3
    assert calls[1] != calls[2]


async def test_connect_failure_ejects_and_retries_on_the_next_server() -> None:
    attempts: Counter[int | None] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        attempts[request.url.port] += 1
        if request.url.port == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, text=str(request.url.port))

    registry = inventory(1, 2, 3)
    client, transport = await client_for(registry, handler)
    async with client:
        # even POST: a refused connection never reached a server
        bodies = [(await client.post("http://inventory/x", content=b"1")).text for _ in range(30)]
    assert attempts[1] == 1, "the dead instance was chosen for exactly one failed connect"
    assert set(bodies) == {"2", "3"}
    assert transport.stats.connect_failures == 1
    assert transport.stats.ejections == 1
    assert transport.stats.failed_calls == 0


async def test_read_timeout_of_a_get_is_retried_elsewhere_without_ejection() -> None:
    slow: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.port == 1:
            slow.append(request.method)
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200)

    client, transport = await client_for(inventory(1, 2), handler)
    async with client:
        for _ in range(4):
            assert (await client.get("http://inventory/x")).status_code == 200
    assert transport.stats.read_failures == len(slow) >= 2
    assert transport.stats.ejections == 0, "a slow answer is no reason to eject"

    client, transport = await client_for(inventory(1), handler)
    async with client:
        with pytest.raises(httpx.ReadTimeout) as err:
            await client.delete("http://inventory/x")  # retried on the only server, then fails
        assert "gave up after 2 attempt(s) on inventory" in str(err.value.__notes__)
        with pytest.raises(httpx.ReadTimeout) as err:
            await client.post("http://inventory/x")  # may have been applied: not retried
        assert "POST not retried: the server may have applied it" in str(err.value.__notes__)
    assert slow[-3:] == ["DELETE", "DELETE", "POST"]


async def test_a_broken_connection_makes_the_instance_suspect() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.port == 1:
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return httpx.Response(200)

    client, transport = await client_for(inventory(1, 2), handler)
    async with client:
        assert (await client.get("http://inventory/x")).status_code == 200  # retried on 2
        balancer = await transport.balancer("inventory")
        suspect = next(i for i in balancer.eligible() if i.port == 1)
        assert balancer.is_suspect(suspect)
        assert transport.stats.ejections == 0


async def test_each_attempt_gets_the_policys_timeouts() -> None:
    timeouts: list[dict[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        return httpx.Response(200)

    policy = RetryPolicy(connect=0.2, read=1.5)
    client, _ = await client_for(inventory(1), handler, policy=policy)
    async with client:
        await client.get("http://inventory/x")
    assert timeouts == [{"connect": 0.2, "read": 1.5, "write": 1.5, "pool": 0.2}]


async def test_transport_retries_are_capped_by_the_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0, window=10.0, clock=clock)
    sent = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return httpx.Response(503)

    policy = RetryPolicy(max_auto_retries=3, max_auto_retries_next_server=3)
    client, transport = await client_for(inventory(1, 2, 3), handler, policy=policy, budget=budget)
    async with client:
        for _ in range(100):
            await client.get("http://inventory/x")
    print(f"\ntransport under a 100% failing dependency: {sent} attempts for 100 calls")
    assert transport.stats.retries == budget.retries <= 20
    assert sent <= 120  # 16 attempts per call (1,600) without the budget
    assert transport.stats.budget_denied >= 80


async def test_no_instance_is_a_clear_error() -> None:
    registry = FakeRegistry(
        FakeView(
            "inventory", instance("down", 1).model_copy(update={"status": InstanceStatus.DOWN})
        )
    )
    client, transport = await client_for(registry, lambda r: httpx.Response(200))
    async with client:
        with pytest.raises(NoInstanceAvailable, match=r"no instance of 'inventory'.*1 registered"):
            await client.get("http://inventory/x")
    assert transport.stats.failed_calls == 1


async def test_deadline_bounds_the_whole_call() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200)

    policy = RetryPolicy(connect=0.01, read=0.01, max_auto_retries_next_server=0, deadline=0.05)
    client = await async_client(
        inventory(1), services=["inventory"], policy=policy, inner=httpx.MockTransport(handler)
    )
    async with client:
        with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.05s"):
            await client.get("http://inventory/x")


async def test_warm_up_loads_views_before_the_first_call_and_others_pass_through() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200)

    registry = inventory(1)
    client, _ = await client_for(registry, handler)
    assert registry.watched == ["inventory"], "loaded by async_client, before any call"
    async with client:
        await client.get("http://inventory/x")
        await client.get("http://example.org/x")  # not a listed service: unchanged
    assert hosts == ["10.0.0.1", "example.org"]
    assert registry.watched == ["inventory"]

    lazy = BusregTransport(registry, lazy=True, inner=httpx.MockTransport(handler))
    async with httpx.AsyncClient(transport=lazy) as http:
        results = await asyncio.gather(*(http.get("http://inventory/y") for _ in range(5)))
    assert all(r.status_code == 200 for r in results)
    assert registry.watched == ["inventory", "inventory"], "one load for concurrent first calls"


async def test_zone_is_passed_to_the_balancer() -> None:
    registry = FakeRegistry(
        FakeView("inventory", instance("a", 1, zone="z1"), instance("b", 2, zone="z2"))
    )
    ports: list[int | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ports.append(request.url.port)
        return httpx.Response(200)

    client, transport = await client_for(registry, handler, zone="z2")
    async with client:
        for _ in range(5):
            await client.get("http://inventory/x")
    assert ports == [2] * 5
    assert isinstance(await transport.balancer("inventory"), ZoneAware)
    custom = BusregTransport(registry, balancer=lambda v: RoundRobin(v, metadata={"x": "y"}))
    assert (await custom.balancer("inventory")).metadata == {"x": "y"}
