"""``safepoint plot``: a run's metrics against the step, one panel per metric.

The data come from the run log, which remembers every save and skip, including
checkpoints that retention has since deleted. One folder often holds two runs of
checkpoints (a best-only ``ModelCheckpoint`` beside a per-epoch one): each is its own
series, named by its manager's name template (``series`` in the log record or in the
checkpoint's manifest) or, for records that predate it, by the checkpoint name with
its digits masked (``weights.#-#.#.hdf5``). Saved checkpoints are filled markers,
evaluations that were not saved hollow ones.

Drawn with matplotlib when it is installed (any format it writes); otherwise as a
self-contained SVG with the same axes, ticks, labels and legend, so the command works
in a bare environment.
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from safepoint.catalog.index import Catalog
from safepoint.cli.remote import storage_at
from safepoint.errors import ConfigError, SafepointError
from safepoint.storage import runlog
from safepoint.storage.urls import is_url

__all__ = ["Point", "collect", "plot", "ticks"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    saved: bool


#: metric -> series -> points, in log order.
Data = dict[str, dict[str, list[Point]]]


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _pattern(name: str) -> str:
    """A checkpoint name with its numbers masked: the key of its series."""
    return _NUMBER.sub("#", name)


def _template_pattern(template: str) -> str:
    """The same key for a name template: ``best-{step:08d}`` -> ``best-#``."""
    return _pattern(re.sub(r"\{[^{}]*\}", "#", template))


def _series_of(catalog: Catalog, name: str) -> str | None:
    """The ``series`` a checkpoint's manifest records, if it still exists and has one."""
    try:
        value = catalog.manifest(name).extra.get("series")
    except (OSError, SafepointError):
        return None
    return value if isinstance(value, str) else None


def collect(root: str, *, metrics: list[str] | None = None) -> Data:
    """Points of every numeric, finite metric of the run log, grouped by series.

    A record's series is its ``series`` (a name template: skip records carry it) or
    that of its checkpoint's manifest; for saves of checkpoints deleted since, the
    name with its numbers masked, which is what the template masks to as well.
    """
    storage = storage_at(root)
    catalog = Catalog(storage)
    events = [e for e in runlog.read(storage) if e.get("event") in ("save", "skip")]
    shown: dict[str, str] = {}  # series key -> label (the template, once one is known)
    keys: list[str] = []
    looked_up: dict[str, str | None] = {}
    last = "run"
    for e in events:
        template, name = e.get("series"), e.get("name")
        if not isinstance(template, str) and e["event"] == "save" and isinstance(name, str):
            if name not in looked_up:  # a re-saved name (weights.best.h5): read it once
                looked_up[name] = _series_of(catalog, name)
            template = looked_up[name]
        if isinstance(template, str):
            key = _template_pattern(template)
            shown[key] = template
        elif e["event"] == "save" and isinstance(name, str):
            key = _pattern(name)
        else:
            key = last  # an old skip record: the series of the save before it
        keys.append(key)
        last = key
    data: Data = {}
    for i, (e, key) in enumerate(zip(events, keys, strict=True)):
        step = e.get("step")
        x = step if isinstance(step, int) and not isinstance(step, bool) else i
        label = shown.get(key, key)
        for metric, value in (e.get("metrics") or {}).items():
            if metrics and metric not in metrics:
                continue
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and math.isfinite(value):
                point = Point(float(x), float(value), e["event"] == "save")
                data.setdefault(metric, {}).setdefault(label, []).append(point)
    missing = sorted(set(metrics or ()) - set(data))
    if missing:
        raise ConfigError(
            f"No metric {', '.join(map(repr, missing))} in the run log of {storage.root}. "
            f"Expected one of {sorted(_all_metrics(events))}. Received: --metric "
            f"{' --metric '.join(missing)}. Pick one of those names."
        )
    return data


def _all_metrics(events: list[dict[str, Any]]) -> set[str]:
    return {k for e in events for k in (e.get("metrics") or {})}


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5, 5 times a power of ten) in [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9) * step
    n = math.floor((hi - first) / step + 1e-9)
    return [round(first + i * step, 12) for i in range(n + 1)]


def plot(root: str, out: str, *, metrics: list[str] | None = None) -> tuple[int, int, str]:
    """Draw the run's metrics into ``out``; return (points, series, renderer)."""
    data = collect(root, metrics=metrics)
    title = f"safepoint run {root if is_url(root) else os.path.abspath(root)}"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not out.lower().endswith(".svg"):
            raise ConfigError(
                f"Writing {out!r} needs matplotlib, which is not installed. Expected an .svg "
                f"output without it. Received: --out {out}. Install matplotlib, or pass "
                "--out NAME.svg."
            ) from None
        renderer = "built-in SVG"
        text = _svg(data, title)
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        renderer = "matplotlib"
        _matplotlib(data, title, out)
    points = sum(len(p) for by_series in data.values() for p in by_series.values())
    series = len({s for by_series in data.values() for s in by_series})
    return points, series, renderer


def _matplotlib(data: Data, title: str, out: str) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays searchable
        _draw(Figure, data, title, out)


def _draw(figure: Any, data: Data, title: str, out: str) -> None:
    """Draw with matplotlib's object API (``figure`` is its ``Figure`` class): no pyplot,
    so no global backend or open-figure state in the caller's process."""
    panels = sorted(data) or [""]
    fig = figure(figsize=(8, 1.2 + 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    fig.suptitle(title)
    if not data:
        axes[0].text(0.5, 0.5, "No metrics in the run log yet.", ha="center")
    order = sorted({s for by_series in data.values() for s in by_series})
    for ax, metric in zip(axes, panels, strict=True):
        for label, pts in sorted(data.get(metric, {}).items()):
            color = _COLORS[order.index(label) % len(_COLORS)]
            xs, ys = [p.x for p in pts], [p.y for p in pts]
            ax.plot(xs, ys, color=color, linewidth=1, label=label)
            saved = [p for p in pts if p.saved]
            skipped = [p for p in pts if not p.saved]
            ax.scatter([p.x for p in saved], [p.y for p in saved], s=14, color=color)
            ax.scatter(
                [p.x for p in skipped], [p.y for p in skipped], s=14, facecolors="white",
                edgecolors=color,
            )  # fmt: skip
        ax.set_ylabel(metric)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if data:
            ax.legend(fontsize="small", title="saved ●  skipped ○", title_fontsize="small")
    fig.savefig(out)


def _svg(data: Data, title: str) -> str:
    width, panel, left, right = 760, 230, 80, 20
    order = sorted({s for by_series in data.values() for s in by_series})
    height = 60 + panel * max(len(data), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="{left}" y="24" font-size="15">{html.escape(title)}</text>',
    ]
    if not data:
        parts.append(f'<text x="{left}" y="70">No metrics in the run log yet.</text>')
    for n, metric in enumerate(sorted(data)):
        by_series = data[metric]
        top, plot_h, plot_w = 50 + n * panel, panel - 80, width - left - right
        pts = [p for s in by_series.values() for p in s]
        xt = ticks(min(p.x for p in pts), max(p.x for p in pts))
        yt = ticks(min(p.y for p in pts), max(p.y for p in pts))
        x0, x1 = min(xt[0], min(p.x for p in pts)), max(xt[-1], max(p.x for p in pts))
        y0, y1 = min(yt[0], min(p.y for p in pts)), max(yt[-1], max(p.y for p in pts))
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

        def sx(x: float, x0: float = x0, x1: float = x1, w: int = plot_w) -> float:
            return left + (x - x0) / (x1 - x0) * w

        def sy(y: float, y0: float = y0, y1: float = y1, top: int = top, h: int = plot_h) -> float:
            return top + h - (y - y0) / (y1 - y0) * h

        bottom = top + plot_h
        parts.append(
            f'<g class="axes" data-metric="{html.escape(metric)}">'
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
            'stroke="#444"/>'
        )
        for t in xt:
            parts.append(
                f'<line class="xtick" x1="{sx(t):.1f}" y1="{bottom}" x2="{sx(t):.1f}" '
                f'y2="{bottom + 5}" stroke="#444"/><text x="{sx(t):.1f}" y="{bottom + 18}" '
                f'text-anchor="middle">{t:.6g}</text>'
            )
        for t in yt:
            parts.append(
                f'<line class="ytick" x1="{left - 5}" y1="{sy(t):.1f}" x2="{left}" '
                f'y2="{sy(t):.1f}" stroke="#444"/><text x="{left - 8}" y="{sy(t) + 4:.1f}" '
                f'text-anchor="end">{t:.6g}</text>'
            )
        parts.append(
            f'<text class="xlabel" x="{left + plot_w / 2:.0f}" y="{bottom + 36}" '
            'text-anchor="middle">step</text>'
            f'<text class="ylabel" transform="translate(16,{top + plot_h / 2:.0f}) rotate(-90)" '
            f'text-anchor="middle">{html.escape(metric)}</text>'
        )
        for k, (label, series) in enumerate(sorted(by_series.items())):
            color = _COLORS[order.index(label) % len(_COLORS)]
            line = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in series)
            parts.append(
                f'<polyline class="series" data-series="{html.escape(label)}" points="{line}" '
                f'fill="none" stroke="{color}"/>'
            )
            for p in series:
                fill = color if p.saved else "white"
                parts.append(
                    f'<circle cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="2.5" fill="{fill}" '
                    f'stroke="{color}"/>'
                )
            ly = top + 14 + 16 * k
            parts.append(
                f'<line x1="{left + plot_w - 170}" y1="{ly - 4}" x2="{left + plot_w - 150}" '
                f'y2="{ly - 4}" stroke="{color}"/><text class="legend" '
                f'x="{left + plot_w - 145}" y="{ly}">{html.escape(label)}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
