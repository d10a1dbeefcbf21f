"""The seed's data: the Pima CSV from ``../shared/data/`` when present, else its shape."""

from __future__ import annotations

import os

import numpy as np

CSV = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "..",
    "..",
    "shared",
    "data",
    "pima-indians-diabetes.csv",
)


def pima() -> tuple[np.ndarray, np.ndarray]:
    """768 rows of 8 features and a 0/1 label (generated, seeded, when the CSV is absent)."""
    if os.path.exists(CSV):
        data = np.loadtxt(CSV, delimiter=",")
        return data[:, :8], data[:, 8]
    rng = np.random.default_rng(7)
    x = rng.normal(size=(768, 8)) * [3, 30, 20, 15, 100, 8, 0.3, 12] + [
        4,
        120,
        70,
        20,
        80,
        32,
        0.5,
        33,
    ]
    y = (x[:, 1] + 10 * x[:, 5] + rng.normal(scale=40, size=768) > 445).astype(np.float64)
    return x, y
