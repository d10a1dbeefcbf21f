"""Hugging Face Trainer tests: a tiny GPT-2 built from a config (no hub), on CPU."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def mark_training_e2e(items: list[pytest.Item], here: str) -> None:
    """Every test here trains a real model: the e2e set (``make test`` runs it,
    ``make test-fast`` leaves it out)."""
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_training_e2e(items, os.path.dirname(os.path.abspath(__file__)))
