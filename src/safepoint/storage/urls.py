"""Checkpoint locations given as URLs: which backend opens them, and how they split.

A root is a local path or ``s3://BUCKET/PREFIX``. The manager, :func:`safepoint.load`
and the CLI all resolve a location here, so one URL means the same thing everywhere
and an unsupported scheme gets the same error. obstore is imported only when an
``s3://`` location is opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from safepoint.errors import ConfigError

if TYPE_CHECKING:
    from safepoint.storage.protocol import Storage

#: The URL schemes a checkpoint root may use (local paths need none).
SCHEMES = ("s3",)


def is_url(text: str) -> bool:
    """Whether ``text`` names a location by URL (``scheme://...``), not a local path."""
    return "://" in text


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage of the root ``url``; ``ConfigError`` for an unsupported scheme.

    An S3 root checks its endpoint, credentials and bucket at once (one LIST), so a
    typo fails here, not after an epoch of training.
    """
    scheme = url.partition("://")[0]
    if scheme == "s3":
        from safepoint.storage.s3 import open_root  # obstore loads only for S3 roots

        return open_root(url, storage_options)
    raise ConfigError(
        "Unsupported URL scheme for a checkpoint root. Expected a local path or "
        f"s3://BUCKET/PREFIX. Received: root={url!r}. Use a local or network-mounted "
        "directory, or an S3-compatible bucket."
    )


def split_url(url: str) -> tuple[str, str]:
    """``(root URL, name)`` of a checkpoint URL: ``s3://b/run/step-3`` ->
    ``("s3://b/run", "step-3")``; ``ConfigError`` when there is no name to split off."""
    scheme, _, rest = url.partition("://")
    rest = rest.rstrip("/")
    head, sep, name = rest.rpartition("/")
    if not sep or not head or not name:
        raise ConfigError(
            f"{url} names no checkpoint. Expected {scheme}://BUCKET/PREFIX/NAME (a "
            f"checkpoint under a run root). Received: path={url!r}. Add the checkpoint's "
            "name, as 'safepoint ls ROOT' prints it."
        )
    return f"{scheme}://{head}", name


__all__ = ["SCHEMES", "is_url", "open_url", "split_url"]
