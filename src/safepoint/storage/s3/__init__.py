"""Checkpoint roots in S3 buckets (``s3://BUCKET/PREFIX``), through obstore.

:class:`S3Storage` implements :class:`safepoint.storage.protocol.Storage` with a
commit that needs no rename (see :mod:`.backend` and docs/object-storage.md); the modules beside
it hold the configuration (:mod:`.config`), the client with its retries
(:mod:`.client`), uploads and ranged reads (:mod:`.io`), the writer lease
(:mod:`.lease`) and the run log (:mod:`.log`). Only these modules import obstore.
"""

from safepoint.storage.s3.backend import S3Storage, open_root

__all__ = ["S3Storage", "open_root"]
