"""Loading a restored state tree into the live objects it came from.

Restoring is two passes. The first only compares: every key of the target must be in
the checkpoint, and module-like state dicts must have the same keys and shapes; all
problems are gathered into one ``StateMismatchError`` before anything is touched.
The second loads: stateful objects through ``load_state_dict``, arrays and tensors by
copying into them in place, plain values by replacing the dict entry.

A stateful object is loaded only from the state of an object of the same class (the
tree records it): Adam's moments restored into an SGD would "work" and be wrong. Module
state dicts are matched across the wrappers that rename every key: ``torch.compile``
(``_orig_mod.``) and ``DataParallel``/``DistributedDataParallel`` (``module.``). With
``strict=False`` whatever does not fit is skipped and named in a
:class:`StateMismatchWarning`, never skipped silently.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np

from safepoint.errors import StateMismatchError, StateMismatchWarning
from safepoint.state.stateful import view
from safepoint.state.tree import is_torch_tensor


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or is_torch_tensor(value)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value.shape)


def _join(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


_COMPILED = "_orig_mod."  # torch.compile's OptimizedModule keeps the model under this name
_PARALLEL = "module."  # DataParallel / DistributedDataParallel


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_module(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _other_class(target: Any, loaded: Any) -> str | None:
    """The saved class of ``loaded`` when it is not ``target``'s, else None.

    Compared by class name, so a class saved from ``__main__`` restores into the same
    class imported from its module. Modules are matched by their keys and shapes
    instead (a compiled model is an ``OptimizedModule`` around the same weights).
    """
    saved = getattr(loaded, "saved_class", "")
    if not saved or _is_module(target):
        return None
    return None if saved.rsplit(".", 1)[-1] == type(target).__name__ else saved


def _strip_compiled(key: Any) -> Any:
    if not isinstance(key, str):
        return key
    dotted = "." + key
    while "." + _COMPILED in dotted:
        dotted = dotted.replace("." + _COMPILED, ".")
    return dotted[1:]


def _aligned(current: Any, loaded: Any) -> Any:
    """``loaded`` with its keys renamed to ``current``'s across compile/DDP wrappers.

    Only whole-key renames that map one key to one key are made; anything else is
    left for the comparison to report.
    """
    if not (isinstance(current, Mapping) and isinstance(loaded, Mapping)):
        return loaded
    if set(loaded) == set(current):
        return loaded
    out = dict(loaded)
    strs = [k for k in out if isinstance(k, str)]
    mine = [k for k in current if isinstance(k, str)]
    if strs and all(k.startswith(_PARALLEL) for k in strs):
        if not any(k.startswith(_PARALLEL) for k in mine):
            out = {k[len(_PARALLEL) :] if isinstance(k, str) else k: v for k, v in out.items()}
    elif mine and all(k.startswith(_PARALLEL) for k in mine) and strs:
        out = {_PARALLEL + k if isinstance(k, str) else k: v for k, v in out.items()}
    by_plain: dict[Any, list[Any]] = {}
    for k in current:
        by_plain.setdefault(_strip_compiled(k), []).append(k)
    renamed = {}
    for k, v in out.items():
        match = by_plain.get(_strip_compiled(k), [])
        renamed[match[0] if len(match) == 1 else k] = v
    return renamed if len(renamed) == len(out) else out


class _Problems:
    def __init__(self) -> None:
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []
        self.skip: set[str] = set()  # stateful objects not loaded at all (strict=False)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def _compare(target: Any, loaded: Any, path: str, problems: _Problems) -> None:
    stateful = view(target)
    if stateful is not None:
        other = _other_class(target, loaded)
        if other is not None:
            problems.mismatched.append(
                f"{path or '<root>'} (checkpoint holds a {other}, target is a "
                f"{_class_name(target)})"
            )
            problems.skip.add(path)
            return
        current = stateful.state_dict()
        if isinstance(current, Mapping) and current and all(_is_array(v) for v in current.values()):
            if not isinstance(loaded, Mapping):
                problems.mismatched.append(f"{path or '<root>'} (expected a state dict)")
                problems.skip.add(path)
                return
            loaded = _aligned(current, loaded) if _is_module(target) else loaded
            problems.missing += [_join(path, k) for k in current if k not in loaded]
            problems.unexpected += [_join(path, k) for k in loaded if k not in current]
            for k, v in current.items():
                if k in loaded and _is_array(loaded[k]) and _shape(loaded[k]) != _shape(v):
                    problems.mismatched.append(
                        f"{_join(path, k)} (checkpoint {list(_shape(loaded[k]))}, "
                        f"target {list(_shape(v))})"
                    )
        elif isinstance(current, Mapping) and isinstance(current.get("param_groups"), list):
            before = len(problems.missing) + len(problems.mismatched)
            _compare_param_groups(current["param_groups"], loaded, path, problems)
            if len(problems.missing) + len(problems.mismatched) > before:
                problems.skip.add(path)  # the optimizer itself would refuse it
        return
    if isinstance(target, Mapping):
        if not isinstance(loaded, Mapping):
            problems.mismatched.append(
                f"{path or '<root>'} (checkpoint holds {type(loaded).__name__}, target a dict)"
            )
            return
        for k, v in target.items():
            if k not in loaded:
                problems.missing.append(_join(path, k))
            else:
                _compare(v, loaded[k], _join(path, k), problems)
        return
    if isinstance(target, list | tuple):
        # Objects in a list ([generator, discriminator]) are restored in place like
        # those in a dict; a list of plain values may change length (a loss history).
        same = isinstance(loaded, list | tuple) and len(loaded) == len(target)
        if same:
            for i, (v, w) in enumerate(zip(target, loaded, strict=True)):
                _compare(v, w, _join(path, i), problems)
        elif any(view(v) is not None or _is_array(v) for v in target):
            got = f"{len(loaded)} items" if isinstance(loaded, list | tuple) else "no list"
            problems.mismatched.append(
                f"{path or '<root>'} (checkpoint holds {got}, target {len(target)} items)"
            )
        return
    if _is_array(target) and _is_array(loaded) and _shape(target) != _shape(loaded):
        problems.mismatched.append(
            f"{path} (checkpoint {list(_shape(loaded))}, target {list(_shape(target))})"
        )
    elif _is_array(target) and not _is_array(loaded):
        # Loading would replace the user's tensor with a plain value (or a state dict).
        problems.mismatched.append(
            f"{path or '<root>'} (checkpoint holds {type(loaded).__name__}, target an array)"
        )


def _compare_param_groups(current: list[Any], loaded: Any, path: str, problems: _Problems) -> None:
    """Optimizer-shaped state: the same number of groups holding as many parameters.

    The optimizer itself would refuse a mismatch only when its turn comes to load,
    after the objects before it in the state were already loaded; checking here keeps
    a failed restore from leaving a half-restored model behind.
    """
    groups = loaded.get("param_groups") if isinstance(loaded, Mapping) else None
    where = _join(path, "param_groups")
    if not isinstance(groups, list):
        problems.missing.append(where)
        return
    want = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in current]
    got = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in groups]
    if want != got:
        problems.mismatched.append(
            f"{where} (checkpoint groups of {got} parameters, target {want})"
        )


def _load(
    target: Any, loaded: Any, path: str, strict: bool, done: list[str], skip: set[str]
) -> Any:
    stateful = view(target)  # loading through a view updates the user's object in place
    if stateful is not None:
        if path in skip:
            return target  # strict=False: named in the warning, left as it is
        try:
            # state_dict() only where needed: some objects draw random numbers in it
            # (a StatefulDataLoader creates its iterator).
            if _is_module(target):
                loaded = _aligned(stateful.state_dict(), loaded)
            if not strict and _accepts_strict(stateful):
                fitting = _fitting(stateful.state_dict(), loaded)
                stateful.load_state_dict(fitting, strict=False)  # type: ignore[call-arg]
            else:
                stateful.load_state_dict(loaded)
        except StateMismatchError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            # The compare pass cannot see inside every object (schedulers, user classes),
            # so say exactly which objects already hold the checkpoint's values.
            partial = (
                f" Already loaded before this failure: {done}; restore them again."
                if done
                else " Nothing else was loaded."
            )
            raise StateMismatchError(
                f"Restoring {path or 'the state'} into {type(target).__name__} failed: {exc}. "
                "Expected the checkpoint to match the object's structure. Build the object "
                "with the configuration the checkpoint was saved from, or pass strict=False."
                + partial,
                mismatched=[path or "<root>"],
            ) from exc
        done.append(path or "<root>")
        return target
    if isinstance(target, MutableMapping) and isinstance(loaded, Mapping):
        for k in list(target):
            if k in loaded:
                target[k] = _load(target[k], loaded[k], _join(path, k), strict, done, skip)
        return target
    if (
        isinstance(target, list | tuple)
        and isinstance(loaded, list | tuple)
        and len(target) == len(loaded)
    ):
        items = [
            _load(v, w, _join(path, i), strict, done, skip)
            for i, (v, w) in enumerate(zip(target, loaded, strict=True))
        ]
        if isinstance(target, list):
            target[:] = items
            return target
        return tuple(items)
    if _is_array(target) and not _is_array(loaded):
        return target  # strict=False: named in the warning, kept
    if isinstance(target, np.ndarray) and isinstance(loaded, np.ndarray):
        if target.shape == loaded.shape and target.dtype == loaded.dtype and target.flags.writeable:
            np.copyto(target, loaded)
            return target
        return loaded
    if is_torch_tensor(target) and is_torch_tensor(loaded):
        if target.shape == loaded.shape and target.dtype == loaded.dtype:
            torch = sys.modules["torch"]  # loaded: both are its tensors

            with torch.no_grad():
                target.copy_(loaded)
            return target
        return loaded
    return loaded


def _fitting(current: Any, loaded: Any) -> Any:
    """For ``strict=False``: ``loaded`` without the arrays whose shapes do not fit.

    ``load_state_dict(strict=False)`` forgives missing and unexpected keys but still
    refuses a shape mismatch, which would make "load what matches" load nothing.
    """
    if not isinstance(current, Mapping) or not isinstance(loaded, Mapping):
        return loaded
    return {
        k: v
        for k, v in loaded.items()
        if not (
            k in current
            and _is_array(v)
            and _is_array(current[k])
            and _shape(v) != _shape(current[k])
        )
    }


def _accepts_strict(obj: Any) -> bool:
    import inspect

    try:
        return "strict" in inspect.signature(obj.load_state_dict).parameters
    except (TypeError, ValueError):
        return False


def _describe(problems: _Problems) -> str:
    parts = []
    if problems.missing:
        parts.append(f"missing from the checkpoint: {_listed(problems.missing)}")
    if problems.unexpected:
        parts.append(f"in the checkpoint but not the target: {_listed(problems.unexpected)}")
    if problems.mismatched:
        parts.append(f"mismatched: {_listed(problems.mismatched)}")
    return "; ".join(parts)


def _listed(keys: list[str], limit: int = 50) -> str:
    if len(keys) <= limit:
        return repr(keys)
    return f"{keys[:limit]!r} and {len(keys) - limit} more"


def _hint(problems: _Problems) -> str:
    keys = problems.missing + problems.unexpected + problems.mismatched
    if any(_COMPILED in k or f"/{_PARALLEL}" in k for k in keys):
        return (
            " Keys under '_orig_mod.' (torch.compile) or 'module.' (DataParallel) are "
            "matched to a plain model's already; the ones listed differ beyond that prefix."
        )
    return ""


def restore_into(target: Any, loaded: Any, *, strict: bool = True) -> Any:
    """Load ``loaded`` into ``target`` in place; return the (possibly new) value.

    ``strict=False`` loads what fits and warns (:class:`StateMismatchWarning`) naming
    every key and object it skipped.
    """
    problems = _Problems()
    _compare(target, loaded, "", problems)
    if problems and strict:
        raise StateMismatchError(
            "The checkpoint does not fit the state it is restored into; nothing was loaded. "
            + _describe(problems)
            + "."
            + _hint(problems)
            + " Restore into objects built like the saved ones, or pass strict=False to "
            "load what matches.",
            missing=problems.missing,
            unexpected=problems.unexpected,
            mismatched=problems.mismatched,
        )
    if problems:
        warnings.warn(
            StateMismatchWarning(
                "restore(strict=False) did not load all of the checkpoint: "
                + _describe(problems)
                + "."
                + _hint(problems)
                + " Those keys and objects keep their current values."
            ),
            stacklevel=3,
        )
    return _load(target, loaded, "", strict, [], problems.skip)


__all__ = ["restore_into"]
