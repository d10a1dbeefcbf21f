"""Removing what crashed writers left in an S3 root: unreferenced payload, stale uploads.

A mixin of :class:`safepoint.storage.s3.S3Storage` (kept apart: one concept of its
own). :meth:`Cleanup.cleanup_stale` (a manager's first save, ``safepoint gc``) deletes
``.sp-data/<save id>/`` prefixes that no record references once older than the grace
period on the server's clock (dedup blobs are collected by :mod:`.blobs`);
:meth:`Cleanup.abort_stale_uploads` (``safepoint gc`` only) aborts multipart uploads
under the same rule (:mod:`.uploads`). Saves in flight in this process are never
touched, whichever of its storages runs the cleanup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safepoint.errors import CorruptCheckpointError
from safepoint.storage.s3 import uploads, writers

if TYPE_CHECKING:
    from safepoint.storage.s3.client import S3Client
    from safepoint.storage.s3.config import S3Location
    from safepoint.storage.s3.lease import Lease

DATA = ".sp-data"


class Cleanup:
    """The cleanup half of ``S3Storage`` (see the module docstring)."""

    client: S3Client
    location: S3Location
    stale_after: float
    _lease: Lease
    _staged: dict[str, Any]
    _ids: dict[str, str]

    def lock(self) -> None:
        raise NotImplementedError

    def unlock(self) -> None:
        raise NotImplementedError

    def list_names(self) -> list[str]:
        raise NotImplementedError

    def _read_record(self, name: str) -> bytes:
        raise NotImplementedError

    def _delete_prefix(self, prefix: str, *, stage: str, quiet: bool = False) -> None:
        raise NotImplementedError

    def cleanup_stale(self) -> list[str]:
        """Remove payload that no record references, once older than ``stale_after``.

        Runs under the lease (taken here if not held). Payload of a save in flight in
        this process is never touched; a younger prefix may belong to a writer whose
        lease just expired, so it is left for a later run.
        """
        held = self._lease.held
        if not held:
            self.lock()
        try:
            return self._clean()
        finally:
            if not held:
                self.unlock()

    def _clean(self) -> list[str]:
        ids, _ = self.client.list_dirs(DATA, stage="cleanup")
        keep = set(self._staged) | writers.LIVE  # this process's saves in flight
        for name in self.list_names():
            try:
                self._read_record(name)
                keep.add(self._ids[name])
            except (FileNotFoundError, CorruptCheckpointError):
                continue
        candidates = [i for i in ids if i not in keep]
        if not candidates:
            return []
        now = self.client.server_now()
        removed = []
        for save_id in candidates:
            objs = list(self.client.list_all(f"{DATA}/{save_id}/", stage="cleanup"))
            newest = max((o["last_modified"] for o in objs), default=None)
            if newest is not None and (now - newest).total_seconds() > self.stale_after:
                self._delete_prefix(f"{DATA}/{save_id}/", stage="cleanup")
                removed.append(f"{DATA}/{save_id}")
        return removed

    def abort_stale_uploads(self) -> list[str]:
        """Abort the multipart uploads killed writers left, once older than ``stale_after``.

        ``safepoint gc`` runs this (under the lease) after :meth:`cleanup_stale`; a
        manager does not, so a training job's start never waits for botocore
        (:mod:`.uploads`). Returns one entry per upload aborted.
        """
        held = self._lease.held
        if not held:
            self.lock()
        try:
            data_prefix = self.client.location.key(f"{DATA}/")
            keep = set(self._staged) | writers.LIVE  # this process's saves in flight
            aborted = uploads.abort_stale(
                self.client.config,
                self.location.bucket,
                data_prefix,
                now=self.client.server_now(),
                older_than=self.stale_after,
                spare=lambda key: key[len(data_prefix) :].split("/", 1)[0] in keep,
            )
        finally:
            if not held:
                self.unlock()
        return [f"multipart upload {key}" for key in aborted]


__all__ = ["Cleanup"]
