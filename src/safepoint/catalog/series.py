"""Which checkpoints of a shared root a manager owns, ranks and may prune.

A root may hold several series: two callbacks' files, a user's earlier run, files that
are not checkpoints at all. Listing, ``latest`` and ``restore`` see every checkpoint;
retention only ever considers the manager's own series, recorded in each manifest
(``extra["series"]``, the name template) and, for checkpoints written before that
field existed, inferred from the name's shape (:meth:`NameTemplate.matches`).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import stat
from collections.abc import Sequence
from typing import Any

from safepoint.catalog.index import Catalog
from safepoint.catalog.singlefile import container
from safepoint.checkpoint import Checkpoint
from safepoint.errors import ConfigError, SafepointError
from safepoint.ondisk.template import NameTemplate
from safepoint.storage.local import Storage


def member(catalog: Catalog, template: NameTemplate, name: str) -> bool:
    """True when checkpoint ``name`` belongs to the series of ``template``."""
    try:
        found = catalog.manifest(name)
    except (OSError, SafepointError):
        return False  # unreadable now: never pruned on a guess
    recorded = found.extra.get("series")
    if isinstance(recorded, str):
        return recorded == template.template
    return template.matches(name)


def check_monitor(
    monitor: str, metrics: dict[str, Any], listed: Sequence[Checkpoint], root: str
) -> None:
    """``ConfigError`` when neither ``metrics`` nor any listed checkpoint has ``monitor``.

    A typo (``val_acc`` for Keras 3's ``val_accuracy``) would otherwise rank nothing,
    and ``Keep`` delete the real best. Once the metric is known, a save without it
    (mid-epoch) is allowed and simply not ranked.
    """
    if monitor in metrics or any(monitor in c.metrics for c in listed):
        return
    close = difflib.get_close_matches(monitor, list(metrics), n=3, cutoff=0.5)
    hint = f"Did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ConfigError(
        f"The manager monitors {monitor!r} but this save's metrics do not contain it, and no "
        f"checkpoint in {root} does. Expected {monitor!r} among the metrics. Received: "
        f"metrics={sorted(metrics)}. {hint}Pass monitor= one of the metric names you save, "
        "or add the metric to save(metrics=...)."
    )


def serial(storage: Storage) -> Any:
    """The root's in-process save mutex (a no-op for storages without one)."""
    lock = getattr(storage, "serial", None)
    return lock() if lock is not None else contextlib.nullcontext()


def next_seq(catalog: Catalog) -> int:
    """The seq of a new save in ``storage``'s root: above every ``listed`` checkpoint and
    unique in this process, even while other managers of the root commit in the
    background. The one place a seq is chosen (saves, framework files, ``convert``);
    it lists under :func:`serial`, so no commit of this process lands in between.
    """
    storage = catalog.storage
    with serial(storage):
        top = max((c.seq for c in catalog.checkpoints()), default=0)
        reserve = getattr(storage, "next_seq", None)
        return int(reserve(top)) if reserve is not None else top + 1


def _holds_manifest(folder: str) -> bool:
    """True when ``folder`` holds a safepoint ``manifest.json`` (not a web app's)."""
    try:
        fd = os.open(
            os.path.join(folder, "manifest.json"),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except OSError:
        return False
    try:
        head = os.read(fd, 256) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return False
    finally:
        os.close(fd)
    return b'"format": "safepoint"' in head


def refuse_checkpoint_root(root: str) -> None:
    """A root must hold checkpoints, not be one: writing into one would hide the run."""
    parent = os.path.dirname(os.path.abspath(root)) or os.sep
    if os.path.isfile(root) and container(root) is not None:
        what = "a single-file checkpoint"
    elif os.path.isdir(root) and _holds_manifest(root):
        what = "a checkpoint directory (it holds safepoint's manifest.json)"
    else:
        return
    raise ConfigError(
        f"The checkpoint root {root!r} is {what}. Expected the folder that holds the run's "
        f"checkpoints. Received: root={root!r}. Pass its parent folder, {parent!r}, and "
        f"restore(checkpoint={os.path.basename(os.path.abspath(root))!r}) to load this one."
    )


__all__ = ["check_monitor", "member", "next_seq", "refuse_checkpoint_root", "serial"]
