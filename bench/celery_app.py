"""The Celery application the side-by-side bench runs: one no-op task.

Broker and result backend are the Redis that :mod:`bench.celery_side` starts (databases 0 and
1); their URLs come from the environment so the worker and the submitter agree.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "ihbench",
    broker=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


@app.task(name="ihbench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Does nothing, like the noop scanner engine; its result (None) is stored."""
    return None
