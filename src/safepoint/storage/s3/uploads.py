"""Aborting the multipart uploads that killed writers left behind (``gc``, cleanup).

A writer killed mid-upload leaves the parts of its multipart upload on the server:
invisible to every reader and to listings, but stored (and billed) until the upload
is aborted. obstore aborts the uploads of saves that fail, but it can neither list
uploads nor name one it did not start, so this module uses botocore (AWS's own client,
part of the ``s3`` extra, imported only here and only when cleanup runs) for the two
calls obstore lacks: ``ListMultipartUploads`` under the root's payload prefix, and
``AbortMultipartUpload`` for each one older than the grace period, on the server's
clock, so an upload in flight is never touched.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

from safepoint.errors import StorageError

log = logging.getLogger("safepoint")


def _client(config: Mapping[str, Any]) -> Any:
    import botocore.config
    import botocore.session

    session = botocore.session.get_session()
    virtual = str(config.get("virtual_hosted_style_request", "")).lower() in ("1", "true")
    return session.create_client(
        "s3",
        endpoint_url=config.get("endpoint") or None,
        region_name=config.get("region") or "us-east-1",
        aws_access_key_id=config.get("access_key_id") or None,
        aws_secret_access_key=config.get("secret_access_key") or None,
        aws_session_token=config.get("session_token") or None,
        config=botocore.config.Config(
            s3={"addressing_style": "virtual" if virtual else "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        ),
    )


def abort_stale(
    config: Mapping[str, Any],
    bucket: str,
    prefix: str,
    *,
    now: datetime.datetime,
    older_than: float,
    spare: Callable[[str], bool],
) -> list[str]:
    """Abort every multipart upload under ``prefix`` started more than ``older_than``
    seconds before ``now`` (the server's time), except those whose key ``spare``
    keeps (a save in flight in this process); returns the keys aborted.

    Without botocore installed nothing is aborted (a warning says what to do instead).
    """
    try:
        client = _client(config)
    except ImportError:
        log.warning(
            "safepoint: botocore is not installed, so stale multipart uploads under "
            "s3://%s/%s are not aborted; pip install 'safepoint[s3]' or add a bucket "
            "lifecycle rule AbortIncompleteMultipartUpload",
            bucket,
            prefix,
        )
        return []
    import botocore.exceptions

    aborted: list[str] = []
    try:
        pages = client.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                started = upload.get("Initiated")
                key = str(upload.get("Key", ""))
                if not key.startswith(prefix) or not isinstance(started, datetime.datetime):
                    continue
                if (now - started).total_seconds() <= older_than or spare(key):
                    continue  # may be a live writer's
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                aborted.append(key)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise StorageError(
            f"Listing or aborting stale multipart uploads under s3://{bucket}/{prefix} "
            f"failed: {exc}. Check the credentials' s3:ListBucketMultipartUploads and "
            "s3:AbortMultipartUpload permissions; committed checkpoints are intact.",
            stage="cleanup",
        ) from exc
    finally:
        client.close()
    return aborted


__all__ = ["abort_stale"]
