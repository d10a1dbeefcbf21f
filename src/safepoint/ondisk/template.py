"""Checkpoint name templates: ``str.format`` with step, epoch and metric fields.

``"step-{step:08d}"`` or Keras' ``"weights-{epoch:02d}-{val_acc:.2f}"``. Fields must be
plain names (no attribute or index access, which would let a template reach into
objects); the formatted name must be a safe single path component.
"""

from __future__ import annotations

import re
import string
from typing import Any

from safepoint.errors import ConfigError
from safepoint.ondisk.names import check_name


class NameTemplate:
    """A validated name template."""

    def __init__(self, template: str) -> None:
        if not isinstance(template, str) or not template:
            raise ConfigError(
                f"Invalid name template. Expected a non-empty str such as 'step-{{step:08d}}'. "
                f"Received: name={template!r}."
            )
        self.template = template
        self.fields: list[str] = []
        pattern: list[str] = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigError(
                f"Invalid name template: {exc}. Received: name={template!r}. Escape literal "
                "braces as '{{' and '}}'."
            ) from None
        for literal_text, field, spec, _ in parsed:
            pattern.append(re.escape(literal_text))
            if field is None:
                continue
            pattern.append(_field_pattern(spec or ""))
            if not field.isidentifier() or (spec and "{" in spec):
                raise ConfigError(
                    f"Invalid name template field {{{field}}}. Expected a plain name (step, "
                    f"epoch or a metric) with an optional format spec. Received: "
                    f"name={template!r}. Remove attribute, index or nested fields."
                )
            self.fields.append(field)
        self._regex = re.compile("".join(pattern), re.DOTALL)
        literal = template
        for field in self.fields:
            literal = literal.replace(field, "x")
        if "/" in literal or "\\" in literal or "\x00" in literal:
            check_name(template, what="name template")

    def matches(self, name: str) -> bool:
        """True when ``name`` could have been formatted from this template.

        Retention uses it for checkpoints written before manifests recorded their
        series: only names of this template's shape are ever pruned by this manager.
        """
        return self._regex.fullmatch(name) is not None

    def format(self, *, step: int | None, epoch: int | None, metrics: dict[str, Any]) -> str:
        bounded("step", step)
        bounded("epoch", epoch)
        values: dict[str, Any] = {**metrics, "step": step, "epoch": epoch}
        missing = [f for f in self.fields if f not in values or values[f] is None]
        if missing:
            raise ConfigError(
                f"Name template {self.template!r} needs {missing} but they were not given. "
                f"Expected them among step, epoch and the metrics. Received: metrics="
                f"{sorted(metrics)}, step={step!r}, epoch={epoch!r}. Pass them to save() or "
                "change the template."
            )
        try:
            name = self.template.format(**values)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(
                f"Cannot format name template {self.template!r}: {exc}. Received: "
                f"{ {f: values[f] for f in self.fields} }. Match the format spec to the value."
            ) from None
        return check_name(name)


_NUMBER = r"[-+ ]*(?:[0-9_,.]+(?:[eE][-+]?[0-9]+)?|nan|inf|NAN|INF)%?"


def _field_pattern(spec: str) -> str:
    """A regex for what one field with format ``spec`` may format to."""
    kind = spec[-1:] if spec[-1:].isalpha() or spec[-1:] == "%" else ""
    if kind in ("d", "n"):
        return r" *[-+ ]?[0-9_,]+ *"
    if kind in ("e", "E", "f", "F", "g", "G", "%"):
        return rf" *{_NUMBER} *"
    return ".+?"


#: Steps and epochs are stored as JSON numbers and read back as Python ints; 2**63 is
#: far past any real run and well inside what every reader (and ``int``/``str``) accepts.
MAX_COUNTER = 2**63 - 1


def bounded(what: str, value: int | None) -> int | None:
    """``value`` if it is None or at most ``MAX_COUNTER``; ``ConfigError`` otherwise."""
    if value is not None and value > MAX_COUNTER:
        raise ConfigError(
            f"Invalid {what}: it has {value.bit_length()} bits. Expected an int of at most "
            f"2**63 - 1. Received: a {what} too large to store. Pass the real {what} "
            "(a counter of optimizer steps or epochs)."
        )
    return value


__all__ = ["MAX_COUNTER", "NameTemplate", "bounded"]
