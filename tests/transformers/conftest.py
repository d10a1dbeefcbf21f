"""Hugging Face Trainer tests: a tiny GPT-2 built from a config (no hub), on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
