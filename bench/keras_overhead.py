"""What checkpointing costs the seed's Keras run: Keras' ModelCheckpoint vs safepoint's.

The seed's experiment (Pima, 150 epochs, batch 10, validation_split=0.33, best-only
on validation accuracy) runs with no checkpoint callback, with
``keras.callbacks.ModelCheckpoint`` and with ``safepoint.keras.ModelCheckpoint``,
each in a fresh process, in alternating order, ``--reps`` times. Both callbacks write
the same legacy HDF5 model file; safepoint also stages, checksums, embeds its
manifest, fsyncs, renames atomically and fsyncs the directory.

Two measures per run: the wall time of ``fit``, and the time spent inside the
checkpoint callback's hooks (the overhead itself, free of the run-to-run noise of a
shared machine). ``--scenario every`` saves every epoch instead of on improvement.

    python bench/keras_overhead.py                 # the seed's run, 3 repetitions
    python bench/keras_overhead.py --scenario every --reps 3

Target (issue 3): safepoint's overhead over no checkpointing within 1.2x of Keras'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CSV = os.path.join(HERE, "..", "..", "shared", "data", "pima-indians-diabetes.csv")
VARIANTS = ("none", "keras", "safepoint")


def pima() -> tuple[Any, Any]:
    """The Pima CSV when it is next to the repository, else seeded data of its shape."""
    import numpy as np

    if os.path.exists(CSV):
        data = np.loadtxt(CSV, delimiter=",")
    else:
        rng = np.random.default_rng(7)
        x = rng.normal(size=(768, 8)) * [3, 30, 20, 15, 100, 8, 0.3, 12] + 50
        data = np.column_stack([x, (x[:, 1] + 10 * x[:, 5] > 1080).astype(float)])
    return data[:, 0:8], data[:, 8]


def _timed(callback: Any, spent: list[float]) -> None:
    """Accumulate the time spent in the callback's hooks into ``spent[0]``."""
    for hook in ("on_train_begin", "on_epoch_begin", "on_train_batch_end", "on_epoch_end",
                 "on_train_end"):  # fmt: skip
        original = getattr(callback, hook)

        def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        setattr(callback, hook, wrapped)


def child(variant: str, scenario: str, epochs: int, workdir: str) -> dict[str, Any]:
    """One seed run in this process; returns its timings."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    warnings.simplefilter("ignore")
    import keras
    import numpy
    import torch

    torch.set_num_threads(1)
    numpy.random.seed(7)
    keras.utils.set_random_seed(7)
    x, y = pima()
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(12, kernel_initializer="uniform", activation="relu"),
            keras.layers.Dense(8, kernel_initializer="uniform", activation="relu"),
            keras.layers.Dense(1, kernel_initializer="uniform", activation="sigmoid"),
        ]
    )
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    best = scenario == "best"
    os.chdir(workdir)
    callbacks = []
    if variant == "keras":
        name = "weights.best.h5" if best else "weights-{epoch:03d}.h5"
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                name, monitor="val_accuracy", save_best_only=best, mode="max"
            )
        )
    elif variant == "safepoint":
        from safepoint.keras import ModelCheckpoint

        name = "weights.best.hdf5" if best else "weights-{epoch:03d}.hdf5"
        callbacks.append(ModelCheckpoint(name, monitor="val_acc", save_best_only=best, mode="max"))
    spent = [0.0]
    for cb in callbacks:
        _timed(cb, spent)
    started = time.perf_counter()
    model.fit(x, y, validation_split=0.33, epochs=epochs, batch_size=10, callbacks=callbacks,
              verbose=0)  # fmt: skip
    fit_s = time.perf_counter() - started
    return {"variant": variant, "fit_s": fit_s, "callback_s": spent[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--scenario", choices=("best", "every"), default="best")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.scenario, args.epochs, args.workdir)))
        return
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]  # alternate who goes first
        for variant in order:
            with tempfile.TemporaryDirectory(prefix="sp-bench-") as workdir:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--workdir", workdir,
                     "--epochs", str(args.epochs), "--scenario", args.scenario],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant].append(row)
            print(f"rep {rep + 1} {variant:9s} fit {row['fit_s']:7.2f} s  "
                  f"callback {row['callback_s'] * 1000:8.1f} ms", flush=True)  # fmt: skip
    report(results, args)


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    med = {v: statistics.median(r["fit_s"] for r in rows) for v, rows in results.items()}
    cb = {v: statistics.median(r["callback_s"] for r in rows) for v, rows in results.items()}
    print(f"\nscenario={args.scenario} epochs={args.epochs} batch=10 reps={args.reps}\n")
    print("| callback | fit median (s) | fit runs (s) | overhead vs none (s) | in-callback (ms) |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        runs = ", ".join(f"{r['fit_s']:.2f}" for r in results[v])
        over = "" if v == "none" else f"{med[v] - med['none']:+.2f}"
        inside = "" if v == "none" else f"{cb[v] * 1000:.1f}"
        print(f"| {v} | {med[v]:.2f} | {runs} | {over} | {inside} |")
    keras_over = med["keras"] - med["none"]
    ours_over = med["safepoint"] - med["none"]
    print(f"\nin-callback ratio safepoint/keras: {cb['safepoint'] / cb['keras']:.2f}x")
    if keras_over > 0:
        print(f"fit-time overhead ratio safepoint/keras: {ours_over / keras_over:.2f}x")
    else:
        print("fit-time overhead of Keras' callback is below the run-to-run noise")


if __name__ == "__main__":
    main()
