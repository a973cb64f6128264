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
