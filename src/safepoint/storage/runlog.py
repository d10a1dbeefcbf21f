"""The run log: ``safepoint-log.jsonl``, one JSON line per save, skip or deletion.

It is append-only and informational: checkpoints are listed from their manifests,
never from the log. Each line goes out in one ``O_APPEND`` write, so a crash can only
tear the last line, and readers ignore a line that does not parse.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from typing import Any

from safepoint.errors import SafepointError, StorageError
from safepoint.state.tree import encode_float
from safepoint.storage.local import Storage


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return encode_float(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4096:
        return {"$int": hex(value)}  # json.dumps refuses ints past the str digit limit
    if value is None or isinstance(value, str | int | bool):
        return value
    try:
        return encode_float(float(value))
    except (TypeError, ValueError):
        return repr(value)


def record(storage: Storage, event: str, **fields: Any) -> None:
    line = {"event": event, "time": round(time.time(), 6), **_clean(fields)}
    storage.append_log(json.dumps(line, allow_nan=False, sort_keys=True))


def note(storage: Storage, event: str, **fields: Any) -> bool:
    """Append a record, best effort; False (and a warning) when it could not be written.

    The one writer of save and deletion records: the log is informational, and a
    committed checkpoint must never be reported as failed because its line was not
    written.
    """
    try:
        record(storage, event, **fields)
    except SafepointError as exc:
        logging.getLogger("safepoint").warning(
            "safepoint: could not write the run log (%s): %s", event, exc
        )
        return False
    return True


def read(storage: Storage) -> list[dict[str, Any]]:
    """Every well-formed line of the run log (torn or garbled lines are skipped)."""
    out = []
    for raw in storage.read_log().splitlines():
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def _kind(reason: str) -> str:
    """A reason with its numbers masked: "loss=0.5 not better than 0.4" -> one kind."""
    return re.sub(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|nan|inf", "#", reason)


class SkipSummary:
    """Consecutive skips of one kind, coalesced into few ``skip`` records.

    A save policy that runs every N batches would otherwise append a line per skipped
    batch (about 177 bytes: 169 MiB over a million steps). The first skip of a kind
    (same reason but for its numbers, same epoch and series) is written at once, so a
    reader of a live run sees it; the ones that follow are counted, and their summary
    (count, first and last step, the last skip's metrics and reason) is written when a
    skip of another kind arrives, before the next save or deletion record, at
    ``close``, at exit, with the ``max_count``-th skip, or with the first skip that
    comes ``max_seconds`` after the summary began. A crash can lose only a summary not
    yet written, never a save record: those are written directly, after this flushes.
    """

    def __init__(self, storage: Storage, *, max_count: int = 10_000, max_seconds: float = 60.0):
        self.storage = storage
        self.max_count = max_count
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._key: tuple[Any, ...] | None = None
        self._since = 0.0
        self._pid = os.getpid()

    def add(self, *, step: Any, epoch: Any, metrics: Any, reason: str, series: str) -> None:
        key = (_kind(reason), epoch, series)
        fields = {"step": step, "metrics": metrics, "reason": reason, "series": series}
        with self._lock:
            if key != self._key:
                self._write()
                self._key = key
                try:
                    record(self.storage, "skip", epoch=epoch, count=1, first_step=step,
                           last_step=step, **fields)  # fmt: skip
                    return
                except StorageError:
                    pass  # no root yet (skips before the first save): goes with the summary
            if self._pending is None:
                self._since = time.monotonic()
                self._pending = {"count": 0, "first_step": step, "epoch": epoch}
            self._pending.update(count=self._pending["count"] + 1, last_step=step, **fields)
            if (
                self._pending["count"] >= self.max_count
                or time.monotonic() - self._since >= self.max_seconds
            ):
                self._write(keep_kind=True)

    def flush(self) -> None:
        """Write the pending summary, if any (raises the storage's error); the next
        skip starts a new kind, written at once."""
        with self._lock:
            self._write()

    def flush_quietly(self) -> None:
        """``flush`` for finalizers (a manager collected or the process exiting).

        A ``fork()`` child inherits the pending summary; only the process that counted
        the skips writes it, so it is never logged twice.
        """
        if os.getpid() != self._pid:
            return
        try:
            self.flush()
        except Exception as exc:  # informational: never fail an exit over the log
            logging.getLogger("safepoint").warning(
                "safepoint: could not write the run log (skip): %s", exc
            )

    def _write(self, *, keep_kind: bool = False) -> None:
        pending, self._pending = self._pending, None
        if not keep_kind:
            self._key = None
        if pending is not None:
            record(self.storage, "skip", **pending)


__all__ = ["SkipSummary", "note", "read", "record"]
