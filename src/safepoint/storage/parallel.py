"""Running a few independent I/O tasks at once, and failing like one.

Cold reads and fsyncs scale with the requests in flight, so restores (chunk reads) and
dedup saves (blob writes and fsyncs) run their tasks on a small pool. Every task is
waited for before the first error (in task order) is raised, so no thread still
writes into a buffer or a staging directory that the caller then reuses or removes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def run_all(tasks: Sequence[Callable[[], Any]], workers: int) -> None:
    """Run ``tasks``, up to ``workers`` at a time (one task, or one worker: on the
    calling thread); raise the first failure once all have ended."""
    if len(tasks) <= 1 or workers <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        futures = [pool.submit(task) for task in tasks]
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error


__all__ = ["run_all"]
