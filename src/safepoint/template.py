"""Checkpoint name templates: ``str.format`` with step, epoch and metric fields.

``"step-{step:08d}"`` or Keras' ``"weights-{epoch:02d}-{val_acc:.2f}"``. Fields must be
plain names (no attribute or index access, which would let a template reach into
objects); the formatted name must be a safe single path component.
"""

from __future__ import annotations

import string
from typing import Any

from .errors import ConfigError
from .storage import check_name


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
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigError(
                f"Invalid name template: {exc}. Received: name={template!r}. Escape literal "
                "braces as '{{' and '}}'."
            ) from None
        for _, field, spec, _ in parsed:
            if field is None:
                continue
            if not field.isidentifier() or (spec and "{" in spec):
                raise ConfigError(
                    f"Invalid name template field {{{field}}}. Expected a plain name (step, "
                    f"epoch or a metric) with an optional format spec. Received: "
                    f"name={template!r}. Remove attribute, index or nested fields."
                )
            self.fields.append(field)
        literal = template
        for field in self.fields:
            literal = literal.replace(field, "x")
        if "/" in literal or "\\" in literal or "\x00" in literal:
            check_name(template, what="name template")

    def format(self, *, step: int | None, epoch: int | None, metrics: dict[str, Any]) -> str:
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
