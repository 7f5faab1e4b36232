"""BucketTimers: deadlines in buckets, one loop timer per bucket."""

from __future__ import annotations

import asyncio

from server.scheduling.timers import BucketTimers


async def test_deadlines_fire_in_order_never_early_and_cancelled_ones_never() -> None:
    loop = asyncio.get_running_loop()
    fired: list[tuple[str, float]] = []
    all_fired = asyncio.Event()

    def fire(name: str) -> None:
        fired.append((name, loop.time()))
        if len(fired) == 3:
            all_fired.set()

    timers: BucketTimers[str] = BucketTimers(lambda: loop, fire, resolution=0.02)
    start = loop.time()
    deadlines = {"a": start + 0.05, "b": start + 0.051, "c": start + 0.2, "gone": start + 0.06}
    for name, when in deadlines.items():
        timers.arm(name, name, when)
    timers.cancel("gone")
    timers.arm("c", "c", start + 0.12)  # re-armed: the new deadline replaces the old
    assert len(timers) == 3
    assert "gone" not in timers
    async with asyncio.timeout(5):
        await all_fired.wait()
    assert [name for name, _ in fired] == ["a", "b", "c"]
    for name, at in fired:
        expected = start + 0.12 if name == "c" else deadlines[name]
        assert at >= expected - 1e-3, f"{name} fired early"
    assert len(timers) == 0


async def test_a_fire_may_arm_again_and_clear_stops_everything() -> None:
    loop = asyncio.get_running_loop()
    runs: list[int] = []
    second = asyncio.Event()

    def fire(n: int) -> None:
        runs.append(n)
        if n == 0:
            timers.arm("job", 1, loop.time() + 0.01)  # waits on, as a run timer does
        else:
            second.set()

    timers: BucketTimers[int] = BucketTimers(lambda: loop, fire, resolution=0.01)
    timers.arm("job", 0, loop.time())
    async with asyncio.timeout(5):
        await second.wait()
    assert runs == [0, 1]
    timers.arm("later", 2, loop.time() + 0.01)
    timers.clear()
    assert len(timers) == 0
    # Proving a non-event: wait on a loop timer well past the cleared deadline's bucket.
    past = asyncio.Event()
    loop.call_at(loop.time() + 0.05, past.set)
    async with asyncio.timeout(5):
        await past.wait()
    assert runs == [0, 1]
