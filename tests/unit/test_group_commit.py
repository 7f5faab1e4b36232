"""The PostgreSQL store's group commit: what arrives while batches are written goes together
into the next one, and at most ``depth`` batches are written at once."""

from __future__ import annotations

import asyncio

from server.storage.postgres.repository import _GroupCommit


class Writer:
    """Batches that stay open until the test releases them."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.open: list[asyncio.Event] = []
        self.started = asyncio.Event()

    async def run(self, batch: list[int]) -> None:
        self.batches.append(batch)
        release = asyncio.Event()
        self.open.append(release)
        self.started.set()
        await release.wait()

    async def next_batch(self) -> None:
        self.started.clear()
        await asyncio.wait_for(self.started.wait(), 5)


async def test_one_batch_at_a_time_gathers_what_arrived_while_it_was_written() -> None:
    writer, tasks = Writer(), set[asyncio.Task[None]]()
    group = _GroupCommit(writer.run, "test", tasks)
    group.add(1)
    group.add(2)  # the same loop turn: one batch
    await writer.next_batch()
    group.add(3)
    group.add(4)
    await asyncio.sleep(0)  # a turn for a second batch to start, which must not happen
    assert writer.batches == [[1, 2]]
    writer.open[0].set()
    await writer.next_batch()
    assert writer.batches == [[1, 2], [3, 4]]
    writer.open[1].set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_depth_two_writes_two_batches_at_once_and_a_third_waits() -> None:
    writer, tasks = Writer(), set[asyncio.Task[None]]()
    group = _GroupCommit(writer.run, "test", tasks, depth=2)
    group.add(1)
    await writer.next_batch()
    group.add(2)
    await writer.next_batch()  # started while the first is still open
    group.add(3)
    group.add(4)
    await asyncio.sleep(0)
    assert writer.batches == [[1], [2]]
    writer.open[1].set()  # either one ending lets the next start
    await writer.next_batch()
    assert writer.batches == [[1], [2], [3, 4]]
    for release in writer.open:
        release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
