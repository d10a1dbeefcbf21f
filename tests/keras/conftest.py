"""Keras tests run real ``fit`` calls on the torch backend, small and seeded."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest

from safepoint_testing import mark_folder

pytest.importorskip("keras")
pytest.importorskip("torch")
pytest.importorskip("h5py")

# Keras 3.15's Variable.__array__ predates NumPy 2's copy= keyword; Keras' own savers
# convert variables that way. Only this message is ignored, only in these tests.
_KERAS_NOISE = ("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_folder(items, __file__, [pytest.mark.filterwarnings(spec) for spec in _KERAS_NOISE])
