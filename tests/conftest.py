"""Suite-wide test settings, and the fixtures the core test files share.

Every test writes below ``tmp_path``; nothing touches the working directory. Helper
functions live in ``safepoint_testing.py`` (importable by name from test files).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from safepoint_testing import read_manifest, write_manifest

# Property tests save real checkpoints, so an example costs milliseconds of disk I/O:
# no deadline (a shared 2-core machine stalls at random), and a function-scoped
# ``tmp_path`` is fine because each example works in its own fresh sub-directory.
# No example database: tests write nothing to the working directory (.hypothesis/).
settings.register_profile(
    "safepoint",
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# `make test-fast` is the edit-test loop: a quarter of the examples (every property
# still runs; `make test` runs the full counts). Tests with their own counts scale them
# through ``safepoint_testing.examples``.
settings.register_profile("fast", settings.get_profile("safepoint"), max_examples=10)
settings.load_profile(os.environ.get("SAFEPOINT_HYPOTHESIS_PROFILE", "safepoint"))


@pytest.fixture
def tamper() -> Callable[[Path, Callable[[dict[str, Any]], None]], None]:
    """Edit a checkpoint's manifest with ``edit(body)`` and re-sign it."""

    def apply(ckpt_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
        body = read_manifest(ckpt_dir)
        edit(body)
        write_manifest(ckpt_dir, body)

    return apply
