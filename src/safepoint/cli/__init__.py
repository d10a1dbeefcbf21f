"""The ``safepoint`` command line: ``main`` parses arguments, the modules beside it act."""

from safepoint.cli.commands import main

__all__ = ["main"]
