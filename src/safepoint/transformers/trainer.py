"""``safepoint.transformers.Trainer``: ``transformers.Trainer`` with safepoint checkpoints.

The Hugging Face ``Trainer`` writes a checkpoint as loose files (``model.safetensors``,
and the pickles ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``training_args.bin``), none of them fsynced, checksummed or committed as a whole, and
its rotation deletes directories with ``shutil.rmtree``. This subclass keeps its
arguments, its control flow and its ``checkpoint-<step>`` names, and replaces the
storage underneath:

- **save**: :meth:`Trainer._save_checkpoint` puts model, optimizer, scheduler, grad
  scaler, every RNG and the ``TrainerState`` (as its JSON) into one
  :class:`~safepoint.CheckpointManager` save: one directory ``output_dir/checkpoint-N``
  holding safepoint's manifest and safetensors payload, committed atomically.
- **retention**: ``save_total_limit`` becomes ``Keep(last=save_total_limit, best=1)``
  (``best`` with ``metric_for_best_model``), applied by the manager after each commit:
  never the newest, never the best. The Trainer's own rotation, and its end-of-training
  deletions, do not run.
- **resume**: ``train(resume_from_checkpoint=True)`` restores the newest checkpoint that
  verifies (a damaged one is skipped with a warning) and a path restores that one.
  The Trainer reads its ``trainer_state.json`` itself, so a private temporary
  directory holding only that JSON stands in for the checkpoint while the Trainer's
  own resume logic (epoch and batch skipping, RNG timing) runs unchanged; the
  ``_load_*`` hooks take their state from the restored checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from typing import Any

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import safepoint
import transformers
from safepoint.catalog.index import UNREADABLE
from safepoint.errors import CheckpointNotFoundError, ConfigError
from safepoint.torch import RNGState

log = logging.getLogger("safepoint")

#: The name template of the checkpoints: the Trainer's own ``checkpoint-<step>``.
NAME = PREFIX_CHECKPOINT_DIR + "-{step}"


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints are committed by safepoint.

    Takes exactly the arguments of ``transformers.Trainer``; see the module docstring
    for what changes underneath. :attr:`checkpoint_manager` is the manager of
    ``output_dir``, for ``checkpoints()``, ``verify()`` or ``restore()``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The manager's Keep replaces the Trainer's rotation; the Trainer must not see a
        # limit, or its end-of-training cleanup rmtree()s every checkpoint but the best.
        self._keep_last: int | None = self.args.save_total_limit
        if self._keep_last is not None:
            self.args = copy.copy(self.args)
            self.args.save_total_limit = None
        self._managers: dict[str, safepoint.CheckpointManager] = {}
        self._restored: dict[str, Any] | None = None

    # -- the manager -----------------------------------------------------------------
    def _monitor(self) -> tuple[str | None, str]:
        metric = self.args.metric_for_best_model
        if metric is None:
            return None, "auto"
        if not metric.startswith("eval_"):
            metric = f"eval_{metric}"
        return metric, "max" if self.args.greater_is_better else "min"

    def _manager_for(self, run_dir: str) -> safepoint.CheckpointManager:
        found = self._managers.get(run_dir)
        if found is None:
            monitor, mode = self._monitor()
            keep = None
            if self._keep_last is not None:
                if self._keep_last < 1:
                    raise ConfigError(
                        "save_total_limit must keep at least one checkpoint. Expected an "
                        f"int >= 1 or None. Received: save_total_limit={self._keep_last!r}."
                        " Pass None to keep every checkpoint."
                    )
                keep = safepoint.Keep(last=self._keep_last, best=1 if monitor else None)
            found = safepoint.CheckpointManager(
                run_dir, name=NAME, monitor=monitor, mode=mode, keep=keep
            )
            self._managers[run_dir] = found
        return found

    @property
    def checkpoint_manager(self) -> safepoint.CheckpointManager:
        """The :class:`~safepoint.CheckpointManager` of ``args.output_dir``."""
        return self._manager_for(str(self.args.output_dir))

    # -- saving ----------------------------------------------------------------------
    def _metrics_now(self) -> dict[str, float]:
        """The evaluation metrics logged at this step (what "best" is judged on)."""
        monitor, _ = self._monitor()
        if monitor is None:
            return {}
        for entry in reversed(self.state.log_history):
            if entry.get("step") != self.state.global_step:
                break
            if monitor in entry:
                return {monitor: float(entry[monitor])}
        return {}

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        step = self.state.global_step
        run_dir = self._get_output_dir(trial=trial)
        best = self.state.best_global_step
        best_dir = os.path.join(run_dir, NAME.format(step=best))
        if best and (best == step or os.path.isdir(best_dir)):
            self.state.best_model_checkpoint = best_dir  # the Trainer's own rule
        state: dict[str, Any] = {"model": self.accelerator.unwrap_model(self.model).state_dict()}
        if not self.args.save_only_model:
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
            if self.lr_scheduler is not None:
                state["scheduler"] = self.lr_scheduler.state_dict()
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            state["rng"] = RNGState()
        exportable = [*self.callback_handler.callbacks, self.control]
        for cb in [c for c in exportable if isinstance(c, ExportableState)]:
            name = cb.__class__.__name__
            saved: Any = self.state.stateful_callbacks  # a dict, whatever its annotation says
            if isinstance(saved.get(name), list):
                saved[name].append(cb.state())
            else:
                saved[name] = cb.state()
        state["trainer_state"] = json.dumps(dataclasses.asdict(self.state), sort_keys=True)
        if self.args.should_save:
            epoch = None if self.state.epoch is None else int(self.state.epoch)
            self._manager_for(run_dir).save(
                state, step=step, epoch=epoch, metrics=self._metrics_now()
            )
        if self.args.push_to_hub:
            self._push_from_checkpoint(os.path.join(run_dir, NAME.format(step=step)))

    # -- resuming --------------------------------------------------------------------
    def _restore(self, requested: str | bool) -> str:
        """Read the checkpoint to resume from; return its path."""
        mgr = self.checkpoint_manager
        if requested is True:
            ckpt = mgr.restore(missing_ok=True)  # the newest that verifies
            if ckpt is None:
                raise ValueError(
                    f"No valid checkpoint found in output directory ({self.args.output_dir})"
                )
        else:
            path = os.path.abspath(os.fspath(str(requested)))
            root, name = os.path.split(path.rstrip(os.sep))
            if os.path.abspath(root) != os.path.abspath(mgr.storage.root):
                mgr = self._manager_for(root)
            try:
                ckpt = mgr.restore(checkpoint=name)
            except CheckpointNotFoundError:
                raise ValueError(f"Can't find a valid checkpoint at {requested}") from None
        assert ckpt is not None
        self._restored = safepoint.load(ckpt.path, as_numpy=False)
        return ckpt.path

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        view: str | None = None
        if resume_from_checkpoint is not None:
            path = self._restore(resume_from_checkpoint)
            assert self._restored is not None
            # The Trainer reads trainer_state.json from the directory it resumes from:
            # a private directory with only that JSON stands in for the checkpoint.
            view = tempfile.mkdtemp(prefix="safepoint-resume-")
            with open(os.path.join(view, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
                f.write(self._restored["trainer_state"])
            log.info("safepoint: resuming from %s", path)
            resume_from_checkpoint = view
        try:
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        finally:
            self._restored = None
            if view is not None:
                shutil.rmtree(view, ignore_errors=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._restored is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        target: Any = self.model if model is None else model
        target.load_state_dict(self._restored["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._restored is None or checkpoint is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        if "optimizer" in self._restored and self.optimizer is not None:
            self.optimizer.load_state_dict(self._restored["optimizer"])
        if "scheduler" in self._restored and self.lr_scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's "call order" notes
                self.lr_scheduler.load_state_dict(self._restored["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        if self._restored is None or checkpoint is None:
            super()._load_scaler(checkpoint)
            return
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in self._restored:
            scaler.load_state_dict(self._restored["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self._restored is None or checkpoint is None:
            super()._load_rng_state(checkpoint)
            return
        if "rng" in self._restored:
            RNGState().load_state_dict(self._restored["rng"])

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None:
            return
        try:
            tree = safepoint.load(best, as_numpy=False)
        except UNREADABLE as exc:
            log.warning("safepoint: cannot load the best model from %s: %s", best, exc)
            return
        model: Any = self.accelerator.unwrap_model(self.model)
        model.load_state_dict(tree["model"])


__all__ = ["NAME", "Trainer"]
