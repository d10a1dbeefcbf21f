"""Hugging Face Trainer tests: a tiny GPT-2 built from a config (no hub), on CPU."""

from __future__ import annotations

import pytest

from safepoint_testing import mark_folder

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here trains a real model: the e2e set (``make test`` runs it,
    ``make test-fast`` leaves it out)."""
    mark_folder(items, __file__, [pytest.mark.e2e])
