"""Lightning tests: real ``Trainer.fit`` runs of a tiny model on CPU."""

from __future__ import annotations

import pytest

from safepoint_testing import mark_folder

pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

# Lightning's own notices about this tiny set-up (few loader workers, a folder reused on
# purpose, torch's pytree deprecation inside Lightning): not ours to fix.
_LIGHTNING_NOISE = (
    "ignore:.*does not have many workers.*",
    "ignore:.*exists and is not empty.*",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
    "ignore:.*number of training batches.*is smaller than the logging interval.*",
    "ignore:.*You called `self.log\\(.*",
    "ignore:.*but have no `val_dataloader`.*",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here trains a real model: the e2e set (``make test`` runs it,
    ``make test-fast`` leaves it out), with Lightning's notices ignored."""
    noise = [pytest.mark.filterwarnings(spec) for spec in _LIGHTNING_NOISE]
    mark_folder(items, __file__, [*noise, pytest.mark.e2e])
