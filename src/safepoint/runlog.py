"""The run log: ``safepoint-log.jsonl``, one JSON line per save, skip or deletion.

It is append-only and informational: checkpoints are listed from their manifests,
never from the log. Each line goes out in one ``O_APPEND`` write, so a crash can only
tear the last line, and readers ignore a line that does not parse.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .storage import Storage
from .tree import encode_float


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
