"""Admission: interactive first, batch only within its headroom, full queue -> ResourceExhausted."""

import asyncio

import pytest

from services.common.errors import ResourceExhausted
from services.router.admission import Admission


async def hold(admission, priority, started, release, order):
    async with admission.admit(priority):
        order.append(priority)
        started.set()
        await release.wait()


def test_interactive_overtakes_queued_batch():
    async def scenario():
        adm = Admission(max_inflight=1, max_queued=10, batch_max_inflight=1)
        release, order = asyncio.Event(), []
        first = asyncio.create_task(hold(adm, "interactive", asyncio.Event(), release, order))
        await asyncio.sleep(0)
        batch = asyncio.create_task(hold(adm, "batch", asyncio.Event(), release, order))
        await asyncio.sleep(0)
        live = asyncio.create_task(hold(adm, "interactive", asyncio.Event(), release, order))
        await asyncio.sleep(0)
        assert adm.queued == 2
        release.set()
        await asyncio.gather(first, batch, live)
        return order, adm.inflight
    order, inflight = asyncio.run(scenario())
    assert order == ["interactive", "interactive", "batch"]
    assert inflight == 0


def test_batch_keeps_headroom_for_interactive():
    async def scenario():
        adm = Admission(max_inflight=4, max_queued=10, batch_max_inflight=1)
        release, order = asyncio.Event(), []
        tasks = [asyncio.create_task(hold(adm, "batch", asyncio.Event(), release, order)) for _ in range(2)]
        await asyncio.sleep(0)
        running = adm.inflight
        live = asyncio.create_task(hold(adm, "interactive", asyncio.Event(), release, order))
        await asyncio.sleep(0)
        live_ran = "interactive" in order
        release.set()
        await asyncio.gather(*tasks, live)
        return running, live_ran
    running, live_ran = asyncio.run(scenario())
    assert running == 1 and live_ran


def test_full_queue_is_resource_exhausted_with_retry_hint():
    async def scenario():
        adm = Admission(max_inflight=1, max_queued=0)
        release = asyncio.Event()
        task = asyncio.create_task(hold(adm, "interactive", asyncio.Event(), release, []))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted) as err:
            async with adm.admit("interactive"):
                pass
        release.set()
        await task
        return err.value
    err = asyncio.run(scenario())
    assert err.retry_after_s > 0 and "capacity" in str(err)


def test_cancelled_waiter_leaves_no_trace():
    async def scenario():
        adm = Admission(max_inflight=1, max_queued=5)
        release = asyncio.Event()
        task = asyncio.create_task(hold(adm, "interactive", asyncio.Event(), release, []))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(hold(adm, "interactive", asyncio.Event(), release, []))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        release.set()
        await task
        return adm.inflight, adm.queued
    assert asyncio.run(scenario()) == (0, 0)


# --- fair share, headroom and tenant limits ---------------------------------------------------

from services.router.fair_queue import FairQueue  # noqa: E402
from services.router.headroom import HeadroomRule  # noqa: E402
from services.router.placement.base import LoadView, WorkerView  # noqa: E402
from services.router.tenants import TenantLimit, TenantLimiter, TenantPolicy  # noqa: E402


@pytest.mark.parametrize("arrivals, weights, expected", [
    # (tenant, tokens) in arrival order -> dispatch order
    ([("a", 100)] * 4 + [("b", 100)] * 2, {}, ["a", "b", "a", "b", "a", "a"]),
    ([("a", 300)] * 3 + [("b", 100)] * 6, {}, ["a", "b", "b", "b", "a", "b", "b", "b", "a"]),
    ([("a", 100)] * 4 + [("b", 100)] * 4, {"b": 3.0}, ["a", "b", "b", "b", "a", "b", "a", "a"]),
    ([("a", 100)] * 2 + [("b", 100)] * 2 + [("c", 100)] * 2, {}, ["a", "b", "c", "a", "b", "c"]),
], ids=["equal-cost", "token-weighted", "tenant-weight", "three-tenants"])
def test_fair_queue_shares_tokens_by_weight(arrivals, weights, expected):
    queue = FairQueue(lambda t: weights.get(t, 1.0))
    for i, (tenant, tokens) in enumerate(arrivals):
        queue.push(tenant, (i, tokens))
    order = []
    while queue:
        tenant, (_, tokens) = queue.pop()
        queue.charge(tenant, tokens)
        order.append(tenant)
    assert order == expected


def test_fair_queue_idle_tenant_banks_no_credit():
    queue = FairQueue()
    for _ in range(3):  # b is served alone for a while; a is idle
        queue.push("b", None)
        queue.charge(queue.pop()[0], 100)
    for i in range(3):
        queue.push("b", i)
        queue.push("a", i)
    order = []
    while queue:
        tenant, _ = queue.pop()
        queue.charge(tenant, 100)
        order.append(tenant)
    assert order == ["b", "a", "b", "a", "b", "a"], "a newcomer alternates; idleness is not credit"


async def _hold_tenant(adm, priority, tenant, tokens, release, order, first_token=True):
    async with adm.admit(priority, tenant, tokens):
        order.append(tenant)
        if first_token:
            adm.first_token()
        await release.wait()


def test_batch_backlog_of_one_tenant_does_not_starve_another():
    async def scenario():
        adm = Admission(max_inflight=1, max_queued=100, batch_max_inflight=1)
        release, done, order = asyncio.Event(), asyncio.Event(), []
        blocker = asyncio.create_task(_hold_tenant(adm, "interactive", "x", 1, release, []))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(_hold_tenant(adm, "batch", t, 100, done, order))
                 for t in ["big"] * 6 + ["small"] * 2]
        await asyncio.sleep(0)
        queued = adm.queued_by_class("batch")
        done.set()
        release.set()
        await asyncio.gather(blocker, *tasks)
        return queued, order
    queued, order = asyncio.run(scenario())
    assert queued == 8
    assert order == ["big", "small", "big", "small", "big", "big", "big", "big"]


def test_batch_waits_without_headroom_and_goes_when_load_reports_change():
    calls = []

    async def scenario():
        room = {"ok": False}

        def headroom():
            calls.append(room["ok"])
            return room["ok"]
        adm = Admission(max_inflight=8, max_queued=10, headroom=headroom)
        release, order = asyncio.Event(), []
        batch = asyncio.create_task(_hold_tenant(adm, "batch", "t", 10, release, order))
        await asyncio.sleep(0.05)
        waited = (list(order), adm.queued)
        live = asyncio.create_task(_hold_tenant(adm, "interactive", "u", 10, release, order))
        await asyncio.sleep(0)
        live_ran = "u" in order
        adm.capacity_changed()  # a load report, still no room
        await asyncio.sleep(0)
        still_waiting = "t" not in order
        room["ok"] = True
        adm.capacity_changed()  # a load report with room
        await asyncio.sleep(0.01)
        dispatched = "t" in order
        release.set()
        await asyncio.gather(batch, live)
        return waited, live_ran, still_waiting, dispatched, adm.inflight
    waited, live_ran, still_waiting, dispatched, inflight = asyncio.run(scenario())
    assert waited == ([], 1), "batch must queue while the pools have no headroom"
    assert live_ran, "interactive dispatches at once whatever the headroom"
    assert still_waiting and dispatched and inflight == 0
    assert len(calls) <= 6, f"headroom must be checked on events, not polled ({len(calls)} checks)"


def test_batch_waits_while_a_live_request_awaits_its_first_token():
    async def scenario():
        adm = Admission(max_inflight=8, max_queued=10, headroom=lambda: True)
        release, order, states = asyncio.Event(), [], []
        live_started = asyncio.Event()

        async def live():
            async with adm.admit("interactive", "u", 10):
                order.append("u")
                live_started.set()
                await asyncio.sleep(0.05)  # prefill: no token yet
                states.append(list(order))
                adm.first_token()
                await asyncio.sleep(0.01)
                states.append(list(order))
                await release.wait()
        live_task = asyncio.create_task(live())
        await live_started.wait()
        batch = asyncio.create_task(_hold_tenant(adm, "batch", "t", 10, release, order))
        await asyncio.sleep(0.08)
        release.set()
        await asyncio.gather(live_task, batch)
        return states
    before, after = asyncio.run(scenario())
    assert before == ["u"], "no batch dispatch while a live request waits for its first token"
    assert after == ["u", "t"], "the first token lets the batch request go"


def test_one_batch_grant_at_a_time_until_placed():
    async def scenario():
        adm = Admission(max_inflight=8, max_queued=10, headroom=lambda: True)
        release, order = asyncio.Event(), []
        blocker = asyncio.create_task(_hold_tenant(adm, "interactive", "x", 1, release, order))
        await asyncio.sleep(0)
        adm._queues["interactive"].push("y", (asyncio.get_running_loop().create_future(), 1))  # hold batch back
        tasks = [asyncio.create_task(_hold_tenant(adm, "batch", "t", 1, release, order)) for _ in range(3)]
        await asyncio.sleep(0)
        adm._queues["interactive"].pop()
        adm.capacity_changed()
        granted_at_once = adm.inflight_by_class["batch"]
        await asyncio.sleep(0)  # the granted waiter resumes (and would be placed)
        adm.capacity_changed()
        granted_after = adm.inflight_by_class["batch"]
        release.set()
        await asyncio.gather(blocker, *tasks)
        return granted_at_once, granted_after
    assert asyncio.run(scenario()) == (1, 2)


@pytest.mark.parametrize("limit, requests, expected", [
    (TenantLimit(max_concurrent=2), [100, 100, 100], ["ok", "ok", "concurrent requests"]),
    (TenantLimit(tokens_per_s=100), [150, 10], ["ok", "tokens/s"]),
    (TenantLimit(tokens_per_s=100, burst_s=3), [150, 100, 60], ["ok", "ok", "ok"]),
    (TenantLimit(tokens_per_s=100, burst_s=3), [150, 100, 60, 1], ["ok", "ok", "ok", "tokens/s"]),
    (TenantLimit(), [10_000] * 5, ["ok"] * 5),
], ids=["concurrency", "rate-debt", "burst", "burst-spent", "unlimited"])
def test_tenant_limits_table(limit, requests, expected):
    limiter = TenantLimiter(TenantPolicy(limit), clock=lambda: 0.0)
    outcomes = []
    for tokens in requests:
        try:
            limiter.acquire("acme", tokens)
            outcomes.append("ok")
        except ResourceExhausted as exc:
            assert exc.retry_after_s > 0 and "acme" in str(exc) and "retry after" in str(exc)
            outcomes.append(next(k for k in ("concurrent requests", "tokens/s") if k in str(exc)))
    assert outcomes == expected


def test_token_bucket_retry_hint_is_when_the_debt_is_paid():
    now = [0.0]
    limiter = TenantLimiter(TenantPolicy(TenantLimit(tokens_per_s=100)), clock=lambda: now[0])
    limiter.acquire("t", 300)  # 100 in the bucket, now 200 in debt
    with pytest.raises(ResourceExhausted) as err:
        limiter.acquire("t", 1)
    assert err.value.retry_after_s == pytest.approx(2.0, abs=0.05)
    now[0] = 1.5
    with pytest.raises(ResourceExhausted):
        limiter.acquire("t", 1)
    now[0] = 2.05
    limiter.acquire("t", 1)
    limiter.acquire("other", 10_000)  # tenants have their own buckets


def test_tenant_policy_file_overrides(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  acme: {max_concurrent: 3, weight: 2}\n  free: {tokens_per_s: 50}\n")
    policy = TenantPolicy.load(str(path), TenantLimit(max_concurrent=10, tokens_per_s=1000))
    assert policy.limit_for("acme") == TenantLimit(max_concurrent=3, tokens_per_s=1000, weight=2)
    assert policy.limit_for("free").tokens_per_s == 50 and policy.limit_for("free").max_concurrent == 10
    assert policy.limit_for("nobody") == TenantLimit(max_concurrent=10, tokens_per_s=1000)
    path.write_text("tenants:\n  acme: {max_concurent: 3}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        TenantPolicy.load(str(path), TenantLimit())


def test_admission_releases_tenant_slots_after_limit_and_cancel():
    async def scenario():
        limiter = TenantLimiter(TenantPolicy(TenantLimit(max_concurrent=1)))
        adm = Admission(max_inflight=4, max_queued=4, limiter=limiter)
        release = asyncio.Event()
        first = asyncio.create_task(_hold_tenant(adm, "interactive", "t", 1, release, []))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="concurrent"):
            async with adm.admit("interactive", "t", 1):
                pass
        async with adm.admit("interactive", "other", 1):
            pass
        release.set()
        await first
        async with adm.admit("interactive", "t", 1):
            pass
        return limiter.active("t"), adm.inflight
    assert asyncio.run(scenario()) == (0, 0)


def _worker(role, waiting=0, running=0, used=0, total=100, queued_tokens=0, inflight=0, healthy=True):
    return WorkerView(f"{role}-x", "addr", role, healthy,
                      LoadView(waiting, running, used, total, queued_tokens, router_inflight=inflight))


@pytest.mark.parametrize("workers, room", [
    ([_worker("decode")], True),
    ([_worker("decode", waiting=1)], False),
    ([_worker("decode", used=85)], False),
    ([_worker("decode", running=8)], False),
    ([_worker("decode", inflight=8)], False),
    ([_worker("decode", healthy=False)], False),
    ([_worker("decode", waiting=2), _worker("decode", running=3)], True),
    ([_worker("decode"), _worker("prefill", queued_tokens=5000)], False),
    ([_worker("decode"), _worker("prefill", queued_tokens=5000), _worker("prefill")], True),
    ([_worker("decode"), _worker("prefill", queued_tokens=5000, healthy=False)], True),
    ([_worker("decode", total=0)], True),
], ids=["idle", "queue", "kv-full", "running-cap", "placed-since-report", "unhealthy", "one-of-two",
        "prefill-busy", "one-prefill-free", "prefill-down-local", "no-report-yet"])
def test_headroom_rule_table(workers, room):
    assert HeadroomRule(max_kv_utilization=0.8, max_running_per_worker=8,
                        max_prefill_queue_tokens=1024).has_room(workers) is room


def _reporting(running, max_running, inflight=0, finished=0):
    return WorkerView("decode-x", "addr", "decode", True, LoadView(
        0, running, 10, 100, router_inflight=inflight, max_running=max_running, router_finished=finished))


@pytest.mark.parametrize("worker, room", [
    (_reporting(running=15, max_running=16), True),                # the worker's own limit, not 8
    (_reporting(running=16, max_running=16), False),
    (_reporting(running=16, max_running=16, finished=1), True),    # a slot freed since the report
    (_reporting(running=16, max_running=16, inflight=16, finished=3), False),  # ours are still there
    (_reporting(running=8, max_running=0), False),                 # no limit reported: 8
    (_reporting(running=7, max_running=0), True),
], ids=["below-own-limit", "at-own-limit", "freed-since-report", "own-inflight-floor", "unreported-8",
        "unreported-7"])
def test_headroom_fills_the_workers_own_slots(worker, room):
    assert HeadroomRule().has_room([worker]) is room
    assert HeadroomRule(max_running_per_worker=4).has_room([worker]) is False  # an explicit cap wins
