"""The S3 requests safepoint makes, each one translated into safepoint errors.

A thin layer over obstore: every call names its stage, every key is relative to the
root's prefix, and every failure goes through :func:`safepoint.storage.s3.config.translate`.
Retries with backoff happen inside obstore (bounded by ``s3_config.MAX_RETRIES`` and
``RETRY_TIMEOUT``); what is still failing after them is reported, never retried into a
commit here.
"""

from __future__ import annotations

import datetime
import errno
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from safepoint.errors import StorageError
from safepoint.storage.s3 import config as s3_config
from safepoint.storage.s3.config import S3Location

T = TypeVar("T")
#: Parts of a multipart upload, and how many go up at once.
PART_SIZE = 16 << 20
UPLOAD_CONCURRENCY = 8


class S3Client:
    """obstore calls on one bucket and prefix."""

    def __init__(self, location: S3Location, config: Mapping[str, Any]) -> None:
        import obstore

        self.obstore = obstore
        self.location = location
        self.endpoint = str(config.get("endpoint") or "")
        self.config = dict(config)  # for the calls obstore lacks (storage.s3.uploads)
        self.store = s3_config.make_store(location, config)
        self._probe_store = s3_config.make_store(location, config, probe=True)

    def url(self, relkey: str) -> str:
        return f"s3://{self.location.bucket}/{self.location.key(relkey)}"

    def call(self, stage: str, relkey: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        try:
            return fn(*args, **kw)
        except Exception as exc:
            s3_config.translate(
                exc, stage=stage, key=self.location.key(relkey), location=self.location
            )

    # -- requests ----------------------------------------------------------------------
    def probe(self) -> None:
        """One cheap LIST (at most one key): checks endpoint, credentials and bucket."""
        store = self._probe_store
        prefix = self.location.key("")

        def first() -> object:
            stream = self.obstore.list(store, prefix or None, chunk_size=1)
            return next(iter(stream), None)

        try:
            self.call("config", "", first)
        except StorageError as exc:
            if exc.errno != errno.EIO:
                raise
            endpoint = self.endpoint or "the AWS default for the region"
            raise StorageError(
                f"Cannot reach the S3 endpoint for root {self.location.url!r}. Expected a "
                f"reachable S3 server. Received: endpoint={endpoint!r} ({exc}). Set "
                "AWS_ENDPOINT_URL or storage_options['endpoint'] to the server's URL (for "
                "example 'http://127.0.0.1:8333') and check the network.",
                errno=errno.EHOSTUNREACH,
                stage="config",
            ) from exc

    def put(
        self,
        relkey: str,
        data: bytes | Sequence[memoryview] | memoryview,
        *,
        stage: str,
        mode: Any = "overwrite",
        attributes: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        key = self.location.key(relkey)
        payload: Any = data if not isinstance(data, list | tuple) else iter(data)
        result = self.call(
            stage,
            relkey,
            self.obstore.put,
            self.store,
            key,
            payload,
            mode=mode,
            attributes=dict(attributes) if attributes else None,
            chunk_size=PART_SIZE,
            max_concurrency=UPLOAD_CONCURRENCY,
        )
        return dict(result)

    def get(
        self, relkey: str, *, stage: str = "read"
    ) -> tuple[bytes, dict[str, Any], dict[str, str]]:
        """The object's bytes, its metadata and its attributes (user metadata)."""
        data, meta, attrs = self.get_capped(relkey, None, stage=stage)
        assert data is not None  # no cap
        return data, meta, attrs

    def get_capped(
        self, relkey: str, limit: int | None, *, stage: str = "read"
    ) -> tuple[bytes | None, dict[str, Any], dict[str, str]]:
        """As :meth:`get`, but an object larger than ``limit`` bytes is not read at all
        (its size comes with the response headers): its bytes are then ``None``."""

        def fetch() -> tuple[bytes | None, dict[str, Any], dict[str, str]]:
            result = self.obstore.get(self.store, self.location.key(relkey))
            meta = dict(result.meta)
            attrs = {str(k): str(v) for k, v in result.attributes.items()}
            if limit is not None and int(meta["size"]) > limit:
                return None, meta, attrs  # the body is dropped unread
            return bytes(result.bytes()), meta, attrs

        return self.call(stage, relkey, fetch)

    def _range(self, relkey: str, start: int, end: int, stage: str) -> Any:
        """obstore's buffer of the object's bytes ``[start, end)`` (one ranged GET)."""
        return self.call(
            stage,
            relkey,
            self.obstore.get_range,
            self.store,
            self.location.key(relkey),
            start=start,
            end=end,
        )

    def get_range(self, relkey: str, start: int, end: int, *, stage: str = "read") -> bytes:
        return b"" if end <= start else bytes(self._range(relkey, start, end, stage))

    def get_range_into(self, relkey: str, start: int, view: memoryview) -> None:
        """Fill ``view`` with the object's bytes from ``start`` (one ranged GET).

        One copy, from obstore's buffer into ``view``; safe to call from several
        threads at once (a parallel restore does).
        """
        end = start + view.nbytes
        if end <= start:
            return
        got = memoryview(self._range(relkey, start, end, "read")).cast("B")
        if got.nbytes != view.nbytes:
            raise EOFError(f"{self.url(relkey)} ended {view.nbytes - got.nbytes} bytes early")
        # numpy copies without holding the GIL (a memoryview slice assignment holds it),
        # so the ranges in flight and the reader's checksum do not take turns.
        np.copyto(np.frombuffer(view, dtype=np.uint8), np.frombuffer(got, dtype=np.uint8))

    def head(self, relkey: str, *, stage: str = "read", quick: bool = False) -> dict[str, Any]:
        """The object's metadata. ``quick``: with the probe's short retries, for best-effort
        calls that must not hold up an exit (releasing a lease that expires anyway)."""
        store = self._probe_store if quick else self.store
        return dict(self.call(stage, relkey, self.obstore.head, store, self.location.key(relkey)))

    def delete(self, relkeys: Sequence[str], *, stage: str, quick: bool = False) -> None:
        if not relkeys:
            return
        keys = [self.location.key(k) for k in relkeys]
        store = self._probe_store if quick else self.store
        self.call(stage, relkeys[0], self.obstore.delete, store, keys)

    def list_dirs(
        self, relprefix: str = "", *, stage: str = "list"
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Immediate sub-prefix names and objects below ``relprefix`` (one LIST per 1000)."""
        prefix = self.location.key(relprefix).rstrip("/")
        result = self.call(
            stage, relprefix, self.obstore.list_with_delimiter, self.store, prefix or None
        )
        strip = len(prefix) + 1 if prefix else 0
        dirs = [p[strip:].rstrip("/") for p in result["common_prefixes"]]
        objs = [dict(o, path=o["path"][strip:]) for o in result["objects"]]
        return dirs, objs

    def list_all(self, relprefix: str, *, stage: str = "list") -> Iterator[dict[str, Any]]:
        """Every object below ``relprefix`` (recursively), keys relative to the root."""
        prefix = self.location.key(relprefix)
        strip = len(self.location.key(""))
        try:
            for chunk in self.obstore.list(self.store, prefix):
                for meta in chunk:
                    yield dict(meta, path=meta["path"][strip:])
        except Exception as exc:
            s3_config.translate(exc, stage=stage, key=prefix, location=self.location)

    def server_now(self) -> datetime.datetime:
        """The server's clock: the time stamp of an object written now (then deleted).

        Lease expiry compares two of the server's own time stamps, so the clocks of the
        machines taking part never matter.
        """
        relkey = f".sp-clock-{secrets.token_hex(8)}"
        self.put(relkey, b"", stage="lease")
        try:
            return self.head(relkey, stage="lease")["last_modified"]  # type: ignore[no-any-return]
        finally:
            self.delete([relkey], stage="lease")


__all__ = ["S3Client"]
