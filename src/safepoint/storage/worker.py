"""The background worker of async saves: one save in flight, errors never lost.

Each async save runs in its own short-lived, *non-daemon* thread. Non-daemon matters:
when the main program ends, Python joins such threads before it exits, so a save
that ``save()`` accepted is committed even if the script returns right after it. A
save that fails in the background keeps its exception; it is raised by the next
``wait()`` or ``save()`` and, if nobody asked before the interpreter exits, reported
on stderr and in the log by an ``atexit`` hook, so a failure is never silent.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable

log = logging.getLogger("safepoint")

_LIVE: weakref.WeakSet[SaveWorker] = weakref.WeakSet()


class SaveWorker:
    """Runs at most one background save at a time and keeps its outcome."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._thread: threading.Thread | None = None
        self._label = ""
        self._error: BaseException | None = None
        _LIVE.add(self)

    def submit(self, label: str, job: Callable[[], object]) -> None:
        """Start ``job`` in the background; the previous one must have been waited for."""
        assert self._thread is None, "submit() before wait()"
        self._label = label

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # kept for wait(); the thread must not print it
                self._error = exc
                log.error("safepoint: background save of %s failed: %s", label, exc)

        self._thread = threading.Thread(target=run, name=f"safepoint-save-{label}", daemon=False)
        self._thread.start()

    def wait(self) -> float:
        """Block until the save in flight has committed; return the seconds waited.

        Raises the exception of a background save that failed (once).
        """
        started = time.perf_counter()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
        return time.perf_counter() - started

    def report(self) -> None:
        """At exit: wait for the save in flight and report a failure nobody collected."""
        label = self._label
        try:
            self.wait()
        except BaseException as exc:
            message = (
                f"safepoint: the async save of {label!r} in {self.where} failed and was NOT "
                f"committed: {exc}. Earlier checkpoints are intact; call wait() after "
                "save() to handle such errors in the program."
            )
            log.error(message)
            print(message, file=sys.stderr)


@atexit.register
def _report_all() -> None:
    for worker in list(_LIVE):
        worker.report()


__all__ = ["SaveWorker"]
