"""Turns (app.turns): heavy steps take turns, one per event-loop iteration, in order."""

from __future__ import annotations

import asyncio

import pytest

from app.turns import turn


async def test_a_callback_ready_meanwhile_runs_between_two_heavy_steps() -> None:
    """Two steps ready together do not run back to back: what became ready during the
    first (a health check, a timer) runs before the second."""
    order: list[str] = []
    loop = asyncio.get_running_loop()

    async def heavy(name: str) -> None:
        async with turn():
            order.append(name)
            if name == "first":
                loop.call_soon(order.append, "between")

    await asyncio.wait_for(asyncio.gather(heavy("first"), heavy("second")), 2)
    assert order == ["first", "between", "second"]


async def test_a_waiter_cancelled_before_or_after_being_handed_the_turn_passes_it_on() -> None:
    done: list[str] = []

    async def heavy(name: str) -> None:
        async with turn():
            done.append(name)

    async with turn():
        queued = [asyncio.create_task(heavy(n)) for n in ("a", "b", "c")]
        await asyncio.sleep(0)  # all three wait for the turn
        queued[0].cancel()
    # The turn is handed to "b" in the next iteration; cancel it right then.
    await asyncio.sleep(0)
    queued[1].cancel()
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 2)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], asyncio.CancelledError)
    assert done == ["c"]
    # Nothing holds the turn any more: a newcomer gets it at once.
    await asyncio.wait_for(heavy("d"), timeout=1)
    assert done[-1] == "d"


@pytest.mark.parametrize("holders", [1, 50])
async def test_every_holder_gets_the_turn_once(holders: int) -> None:
    seen: list[int] = []

    async def heavy(i: int) -> None:
        async with turn():
            seen.append(i)

    await asyncio.wait_for(asyncio.gather(*(heavy(i) for i in range(holders))), timeout=5)
    assert seen == list(range(holders))
