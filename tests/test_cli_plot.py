"""`safepoint plot`: one series per run in a folder, real axes, with and without
matplotlib (issue 10, "Also")."""

from __future__ import annotations

import re
import sys
from xml.etree import ElementTree

import numpy as np
import pytest

import safepoint
from safepoint.cli import main
from safepoint.cli.plot import collect, ticks


@pytest.fixture
def two_runs(tmp_path):
    """A per-epoch series and a best-only series (with skips) saved into one folder."""
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root, name="epoch-{epoch:03d}") as mgr:
        for epoch in range(1, 6):
            mgr.save({"w": np.zeros(2)}, step=10 * epoch, epoch=epoch,
                     metrics={"loss": 1 / epoch})  # fmt: skip
    best = safepoint.CheckpointManager(
        root, name="best-{loss:.3f}.ckpt", monitor="loss", keep=safepoint.Keep(last=1)
    )
    with best:
        for epoch in range(1, 6):
            if epoch % 2:  # saved; retention deletes the older ones
                best.save({"w": np.zeros(2)}, step=10 * epoch, epoch=epoch,
                          metrics={"loss": 2 / epoch})  # fmt: skip
            else:
                best.log_skip(step=10 * epoch, epoch=epoch, metrics={"loss": 3.0}, reason="no")
    return root


def test_two_name_templates_in_one_folder_are_two_series(two_runs):
    data = collect(str(two_runs))
    # the per-epoch run is named by its masked names until its manifests name the template
    assert sorted(data["loss"]) in (
        ["best-{loss:.3f}.ckpt", "epoch-#"],
        ["best-{loss:.3f}.ckpt", "epoch-{epoch:03d}"],
    )
    by_label = {label.split("-")[0]: pts for label, pts in data["loss"].items()}
    assert [p.x for p in by_label["epoch"]] == [10, 20, 30, 40, 50]
    assert [(p.x, p.saved) for p in by_label["best"]] == [
        (10, True), (20, False), (30, True), (40, False), (50, True)
    ]  # fmt: skip


def test_fallback_svg_has_axes_ticks_labels_and_a_legend(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # matplotlib cannot be imported
    out = tmp_path / "m.svg"
    assert main(["plot", str(two_runs), "--out", str(out)]) == 0
    assert "(10 points, 2 series; built-in SVG)" in capsys.readouterr().out
    svg = out.read_text()
    ElementTree.fromstring(svg)  # well-formed XML
    assert svg.count('class="xtick"') >= 3 and svg.count('class="ytick"') >= 3
    assert re.search(r'class="xlabel"[^>]*>step<', svg)
    assert re.search(r'class="ylabel"[^>]*>loss<', svg)
    assert svg.count('class="series"') == 2
    assert svg.count('class="legend"') == 2 and "best-{loss:.3f}.ckpt" in svg
    assert svg.count('fill="white"') == 2  # the two skipped evaluations: hollow
    labels = re.findall(r'text-anchor="middle">([-\d.e]+)</text>', svg)
    assert labels[:5] == ["10", "20", "30", "40", "50"]
    # without matplotlib, only SVG can be written; said before anything is written
    assert main(["plot", str(two_runs), "--out", str(tmp_path / "m.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_matplotlib_draws_png_and_searchable_svg(two_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "m.png"
    assert main(["plot", str(two_runs), "--out", str(png)]) == 0
    assert "2 series; matplotlib" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "m.svg"
    assert main(["plot", str(two_runs), "--out", str(svg)]) == 0
    text = svg.read_text()
    for label in (">step<", ">loss<", "best-{loss:.3f}.ckpt", "epoch-", ">50<"):
        assert label in text


def test_an_unknown_metric_is_named(two_runs, tmp_path, capsys):
    assert main(["plot", str(two_runs), "--metric", "acc", "--out", str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr().err
    assert "No metric 'acc'" in err and "Expected one of ['loss']" in err


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1]),
        (10, 50, [10, 20, 30, 40, 50]),
        (3, 3, [2.6, 2.8, 3, 3.2, 3.4]),
    ],
)
def test_ticks_are_round_numbers(lo, hi, expected):
    assert ticks(lo, hi) == pytest.approx(expected)


def test_a_manifest_series_names_the_series_and_survives_deletion(tmp_path):
    """Saves group by the manifest's extra["series"] (the manager's name template);
    a save whose checkpoint is gone joins it by its masked name."""
    from safepoint import formats
    from safepoint.catalog.directory import write_checkpoint
    from safepoint.ondisk.manifest import Manifest
    from safepoint.state.tree import flatten
    from safepoint.storage import runlog
    from safepoint.storage.local import LocalStorage

    storage = LocalStorage(tmp_path)
    for step in (1, 2):
        name = f"snap-{step:04d}"
        tree, leaves = flatten({"w": np.zeros(2)})
        draft = Manifest(name=name, seq=step, step=step, epoch=None, created=0.0,
                         metrics={"loss": 1.0 / step}, tree=tree, tensors={}, files={},
                         extra={"series": "snap-{step:04d}"})  # fmt: skip
        write_checkpoint(storage, formats.get("safetensors"), draft, leaves,
                         shard_bytes=formats.SHARD_BYTES)  # fmt: skip
        runlog.record(storage, "save", name=name, step=step, metrics={"loss": 1.0 / step})
    storage.remove("snap-0001")  # retention took the first: its series is still known
    data = collect(str(tmp_path))
    assert list(data["loss"]) == ["snap-{step:04d}"]
    assert [p.x for p in data["loss"]["snap-{step:04d}"]] == [1, 2]
