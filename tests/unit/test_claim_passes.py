"""The claim statement numbers the free slots one per demand per pass, in the demands' order,
and takes the first n: ``passes_for`` says how many passes that needs, so the statement
generates no slot past them. Checked against the order itself on random demands."""

from __future__ import annotations

import random

from server.storage.postgres.repository import passes_for


def passes_taken(rooms: list[int], n: int) -> int:
    """The last pass among the first ``n`` slots in (pass, demand) order."""
    order = sorted((p, i) for i, room in enumerate(rooms) for p in range(1, room + 1))
    return max((p for p, _ in order[:n]), default=0)


def test_the_passes_cover_exactly_the_first_n_slots() -> None:
    rng = random.Random(17)
    for _ in range(5000):
        rooms = [rng.randint(1, 12) for _ in range(rng.randint(1, 6))]
        n = rng.randint(1, sum(rooms))
        assert passes_for(rooms, n) == passes_taken(rooms, n), (rooms, n)


def test_more_jobs_than_slots_take_every_pass() -> None:
    assert passes_for([3, 1, 7], 50) == 7
    assert passes_for([128] * 8, 150) == 19
