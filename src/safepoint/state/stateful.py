"""Stateful views: the ``state_dict`` protocol for objects that do not speak it.

The state tree saves any object with ``state_dict()``/``load_state_dict()`` (the
torchsnapshot ``Stateful`` contract). A few objects that training loops hold carry
state without that pair: NumPy's ``Generator`` and ``RandomState``, and, once
:mod:`safepoint.torch` is imported, ``torch.Generator`` and ``DataLoader``. For those
a *view* is registered here: a small object wrapping the live one that reads and
writes its state. Saving uses the view's ``state_dict()``; restoring loads through
the view, so the user's object is updated in place and stays the same object.

Adapters register themselves (``register``), so the core never imports a framework;
a framework module adds its views when the user imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from safepoint.errors import StateMismatchError


class Stateful(Protocol):
    """Anything whose training state round-trips through a plain nested dict."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


_VIEWS: list[tuple[type, Callable[[Any], Stateful]]] = []
_WRAPPERS: list[tuple[type, Callable[[Any], Stateful]]] = []


def register(
    cls: type, make_view: Callable[[Any], Stateful], *, over_protocol: bool = False
) -> None:
    """Save and restore instances of ``cls`` through ``make_view(obj)``.

    Later registrations win, so an adapter can refine a view for a subclass.
    ``over_protocol=True``: use the view even though ``cls`` has its own
    ``state_dict()``, because resuming it exactly needs more than that state (the
    view wraps it; torchdata's ``StatefulDataLoader`` and torch's global RNG).
    """
    (_WRAPPERS if over_protocol else _VIEWS).insert(0, (cls, make_view))


def view(obj: object) -> Stateful | None:
    """``obj``'s wrapping view, else ``obj`` itself if it follows the protocol, else its
    registered view, else None."""
    for cls, make_view in _WRAPPERS:
        if isinstance(obj, cls):
            return make_view(obj)
    if callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    ):
        return obj  # type: ignore[return-value]
    for cls, make_view in _VIEWS:
        if isinstance(obj, cls):
            return make_view(obj)
    return None


class NumpyGeneratorState:
    """A ``numpy.random.Generator``'s bit-generator state (plain ints, or a uint32 key)."""

    def __init__(self, generator: np.random.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return dict(self.generator.bit_generator.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = type(self.generator.bit_generator).__name__
        received = state.get("bit_generator") if isinstance(state, dict) else None
        if received != expected:
            raise StateMismatchError(
                "Restoring a numpy Generator failed. Expected the state of a "
                f"{expected} bit generator. Received: bit_generator={received!r}. Create the "
                f"Generator with the same bit generator as the saved one "
                f"(np.random.Generator(np.random.{received}()))."
            )
        self.generator.bit_generator.state = state


class NumpyRandomStateState:
    """A legacy ``numpy.random.RandomState``'s Mersenne-Twister state."""

    def __init__(self, generator: np.random.RandomState) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return self.generator.get_state(legacy=False)  # type: ignore[return-value]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state)


register(np.random.Generator, NumpyGeneratorState)
register(np.random.RandomState, NumpyRandomStateState)

__all__ = ["NumpyGeneratorState", "NumpyRandomStateState", "Stateful", "register", "view"]
