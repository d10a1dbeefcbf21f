"""Human-facing reports on checkpoints: ``diff`` of two checkpoints, ``plot`` of a run.

Both read only verified data and import no framework: tensors are compared as numpy
arrays (bfloat16 and float8 through their raw bytes when numpy cannot spell them), and
the plot is a self-contained SVG drawn from the run log, which remembers every save and
skip, including checkpoints that retention has since deleted.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any

import numpy as np

from . import formats, runlog
from .reader import read_manifest
from .storage import LocalStorage, check_name


def _open(path: str) -> tuple[LocalStorage, str]:
    full = os.path.abspath(path).rstrip(os.sep)
    parent, name = os.path.split(full)
    return LocalStorage(parent), check_name(name, what="checkpoint directory name")


def _numeric(entry: dict[str, Any], raw: np.ndarray) -> np.ndarray | None:
    try:
        value = formats.materialize(entry, raw, as_numpy=True)
    except Exception:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind in "biufc":
        return arr
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError):
        return None


def diff(a: str, b: str) -> list[str]:
    """Lines describing how checkpoint ``b`` differs from ``a`` (empty when identical)."""
    (sa, na), (sb, nb) = _open(a), _open(b)
    ma, mb = read_manifest(sa, na), read_manifest(sb, nb)
    ra = formats.get(ma.payload).read(sa, na, ma)
    rb = formats.get(mb.payload).read(sb, nb, mb)
    lines: list[str] = []
    for key in sorted(set(ma.tensors) - set(mb.tensors)):
        lines.append(f"- tensor {key} (only in {na})")
    for key in sorted(set(mb.tensors) - set(ma.tensors)):
        lines.append(f"+ tensor {key} (only in {nb})")
    for key in sorted(set(ma.tensors) & set(mb.tensors)):
        ea, eb = ma.tensors[key], mb.tensors[key]
        if (ea["dtype"], ea["shape"]) != (eb["dtype"], eb["shape"]):
            lines.append(
                f"~ tensor {key}: {ea['dtype']}{ea['shape']} -> {eb['dtype']}{eb['shape']}"
            )
            continue
        if np.array_equal(ra[key], rb[key]):
            continue
        va, vb = _numeric(ea, ra[key]), _numeric(eb, rb[key])
        if va is not None and vb is not None and va.size:
            delta = np.abs(
                va.astype(np.complex128 if va.dtype.kind == "c" else np.float64)
                - vb.astype(np.complex128 if vb.dtype.kind == "c" else np.float64)
            )
            rows = ra[key].reshape(va.size, -1) != rb[key].reshape(vb.size, -1)
            changed = int(rows.any(axis=1).sum())
            lines.append(
                f"~ tensor {key}: {changed} of {va.size} values differ, max |a-b| = "
                f"{float(np.nanmax(delta)) if delta.size else 0.0:.6g}"
            )
        else:
            lines.append(f"~ tensor {key}: bytes differ")
    ta = json.dumps(_strip_refs(ma.tree), sort_keys=True, default=str)
    tb = json.dumps(_strip_refs(mb.tree), sort_keys=True, default=str)
    if ta != tb:
        lines.append("~ non-tensor state differs (step counters, settings or structure)")
    for key in sorted(set(ma.metrics) | set(mb.metrics)):
        if ma.metrics.get(key) != mb.metrics.get(key) and not (
            _isnan(ma.metrics.get(key)) and _isnan(mb.metrics.get(key))
        ):
            lines.append(f"~ metric {key}: {ma.metrics.get(key)} -> {mb.metrics.get(key)}")
    if (ma.step, ma.epoch) != (mb.step, mb.epoch):
        lines.append(f"~ step/epoch: {ma.step}/{ma.epoch} -> {mb.step}/{mb.epoch}")
    return lines


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _strip_refs(node: Any) -> Any:
    if isinstance(node, dict):
        if "$tensor" in node:
            return "<tensor>"
        return {k: _strip_refs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_strip_refs(v) for v in node]
    return node


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def plot(root: str, out: str, *, metrics: list[str] | None = None) -> int:
    """Draw each metric of the run log against its step into the SVG file ``out``.

    Returns the number of points drawn. Saved checkpoints are filled dots, skipped
    (not saved) evaluations hollow ones.
    """
    events = [e for e in runlog.read(LocalStorage(root)) if e.get("event") in ("save", "skip")]
    series: dict[str, list[tuple[float, float, bool]]] = {}
    for i, e in enumerate(events):
        step = e.get("step")
        x = step if isinstance(step, int) else i
        for k, v in (e.get("metrics") or {}).items():
            if metrics and k not in metrics:
                continue
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                series.setdefault(k, []).append((float(x), float(v), e["event"] == "save"))
    width, height, pad = 720, 120 + 180 * max(len(series), 1), 50
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="{pad}" y="24" font-size="15">safepoint run {html.escape(root)}</text>',
    ]
    if not series:
        parts.append(f'<text x="{pad}" y="70">No metrics in the run log yet.</text>')
    for n, (name, pts) in enumerate(sorted(series.items())):
        top = 50 + n * 180
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def sx(x: float, x0: float = x0, x1: float = x1) -> float:
            return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

        def sy(y: float, y0: float = y0, y1: float = y1, top: int = top) -> float:
            return top + 140 - (y - y0) / (y1 - y0) * 130

        color = _COLORS[n % len(_COLORS)]
        parts.append(
            f'<text x="{pad}" y="{top}" fill="{color}">{html.escape(name)} '
            f"(min {min(ys):.5g}, max {max(ys):.5g})</text>"
        )
        parts.append(
            f'<rect x="{pad}" y="{top + 8}" width="{width - 2 * pad}" height="134" '
            'fill="none" stroke="#ccc"/>'
        )
        line = " ".join(f"{sx(px):.1f},{sy(py):.1f}" for px, py, _ in pts)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{color}"/>')
        for px, py, saved in pts:
            fill = color if saved else "white"
            parts.append(
                f'<circle cx="{sx(px):.1f}" cy="{sy(py):.1f}" r="2.5" fill="{fill}" '
                f'stroke="{color}"/>'
            )
        parts.append(f'<text x="{pad}" y="{top + 158}">step {x0:g}</text>')
        parts.append(
            f'<text x="{width - pad}" y="{top + 158}" text-anchor="end">step {max(xs):g}</text>'
        )
    parts.append("</svg>")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return sum(len(p) for p in series.values())
