"""``safepoint log``: the run log as lines a person reads.

Each record is one line: the event, the checkpoint name (saves and deletions), where in
the run it happened (step and epoch) and the metrics; a skip also says why it was not
saved, and a coalesced run of skips (``count`` > 1, see
:class:`~safepoint.storage.runlog.SkipSummary`) how many there were and over which steps.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from safepoint.errors import CheckpointNotFoundError, ConfigError
from safepoint.storage.local import LOG_NAME
from safepoint.storage.urls import is_url

__all__ = ["describe", "need_log"]


def need_log(root: str) -> str:
    """``root`` if it has a run log that is a regular file; else the error saying so.

    Checked with ``lstat`` before anything opens it: a FIFO put where the log belongs
    would block a reader forever, and a symlink may point out of the root.
    """
    if is_url(root):
        return root  # an object store keeps the log as objects: nothing to lstat
    path = os.path.join(root, LOG_NAME)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{root} has no run log ({LOG_NAME}). Expected a run root a CheckpointManager "
            f"has saved into. Received: root={root!r}. Check the path; 'safepoint ls "
            f"{root}' lists any checkpoints it has."
        ) from None
    if not stat.S_ISREG(mode):
        what = "a symlink" if stat.S_ISLNK(mode) else "not a regular file (a FIFO or device)"
        raise ConfigError(
            f"The run log {path} is {what}. Expected a regular file written by safepoint. "
            f"Received: mode={stat.filemode(mode)}. safepoint does not follow or open it; "
            "replace it with a regular file."
        )
    return root


def _fmt_metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return ""
    return " ".join(
        f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
    )


def _where(item: dict[str, Any]) -> str:
    count = item.get("count")
    parts = []
    if isinstance(count, int) and count > 1:
        parts.append(f"steps {item.get('first_step')}..{item.get('last_step')}")
    elif item.get("step") is not None:
        parts.append(f"step {item.get('step')}")
    if item.get("epoch") is not None:
        parts.append(f"epoch {item.get('epoch')}")
    return ", ".join(parts)


def describe(item: dict[str, Any]) -> str:
    """One readable line for a run-log record."""
    event = str(item.get("event", "?"))
    if event == "skip":
        count = item.get("count")
        head = f"skip x{count}" if isinstance(count, int) and count > 1 else "skip"
        metrics = _fmt_metrics(item.get("metrics"))
        last = "last " if isinstance(count, int) and count > 1 else ""
        reason = item.get("reason") or "not saved"
        text = f"{head:<10} {_where(item)}: {last}{reason}"
        return f"{text}  ({metrics})" if metrics else text
    name = str(item.get("name", ""))
    tail = _fmt_metrics(item.get("metrics"))
    if event == "delete" and item.get("reason"):
        tail = f"{tail} ({item['reason']})".strip()
    where = _where(item)
    return " ".join(p for p in (f"{event:<10}", name, f"[{where}]" if where else "", tail) if p)
