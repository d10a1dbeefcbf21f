"""``RNGState``: every global random generator a training loop draws from, as state.

Put ``safepoint.RNGState()`` in the checkpointed state; it captures the generators
when the checkpoint is saved and puts them back when it is restored, so dropout
masks and shuffles after a resume are the ones an uninterrupted run would draw.
Captured: Python's ``random``, NumPy's global ``RandomState``, torch's CPU generator
and, when CUDA is initialised, each CUDA device's generator. Torch is consulted only
when the program has already imported it. Nothing is pickled: the states are tuples
of ints and uint8/uint32 arrays.
"""

from __future__ import annotations

import logging
import random
import sys
from typing import Any

import numpy as np

from safepoint.errors import StateMismatchError

log = logging.getLogger("safepoint")


class RNGState:
    """Stateful handle on the process-global random generators."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": {
                "version": version,
                "state": np.asarray(internal, dtype=np.uint64),
                "gauss_next": gauss,
            },
            "numpy": np.random.get_state(legacy=False),
        }
        torch = sys.modules.get("torch")
        if torch is not None:
            state["torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            py = state["python"]
            random.setstate(
                (int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"])
            )
            np.random.set_state(state["numpy"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateMismatchError(
                f"RNG state in the checkpoint is incomplete or malformed: {exc!r}. Expected "
                "the python and numpy generator states RNGState saves. Received keys: "
                f"{sorted(state) if isinstance(state, dict) else type(state).__name__}."
            ) from None
        if "torch" not in state:
            return
        torch = sys.modules.get("torch")
        if torch is None:
            # Nothing in this process draws from torch's generators; importing torch
            # here would load a framework the program does not use.
            log.info(
                "safepoint: the checkpoint holds torch's RNG state, but torch is not "
                "imported, so it is not restored. Import torch before restore() if the "
                "program uses it later."
            )
            return
        torch.set_rng_state(state["torch"])
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["torch_cuda"])


__all__ = ["RNGState"]
