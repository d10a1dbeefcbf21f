"""A reader loading one name in a loop while the writer re-saves it, for tests/s3."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def race(
    load: Callable[[], Any],
    check: Callable[[Any], bool],
    resave: Callable[[int], None],
    *,
    saves: int,
) -> int:
    """Call ``resave(i)`` for i in 1..saves while another thread loads and ``check``s
    what it got; raise the first error the reader met; return how many loads it made."""
    done, errors, loads = threading.Event(), [], [0]

    def read() -> None:
        while not done.is_set():
            try:
                assert check(load()), "a load mixed two versions"
                loads[0] += 1
            except Exception as exc:  # collected and reported below
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, saves + 1):
            resave(i)
    finally:
        done.set()
        reader.join()
    if errors:
        raise AssertionError(f"{len(errors)} loads failed; the first: {errors[0]!r}") from errors[0]
    return loads[0]
