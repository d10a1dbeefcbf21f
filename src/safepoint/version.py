"""The library version, in its own module so every other module can import it."""

__version__ = "0.1.0"

__all__ = ["__version__"]
