"""Where an ``s3://`` root points and how to reach it: URL, endpoint, credentials, retries.

Settings come from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``/``AWS_DEFAULT_REGION``) or from ``storage_options``, whose keys are
obstore's S3 configuration keys (``endpoint``, ``access_key_id``, ``secret_access_key``,
``session_token``, ``region``, ...; the ``aws_`` prefixed and upper-case spellings work
too) and win over the environment. An explicit ``http://`` endpoint is allowed without a
separate switch: whoever typed it meant it.

obstore errors become safepoint errors in exactly one place, :func:`translate`, so every
message names the bucket key and says what to do. obstore is imported only here and in
the other ``s3*`` modules, never by ``import safepoint``.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from safepoint.errors import ConfigError, SafepointError, StorageError

#: Network errors and 5xx answers are retried by obstore with backoff, up to this many
#: times and this long in total, then reported. obstore draws each wait at random
#: between ``init_backoff`` and ``base`` times the previous one (capped at 5 s), so it
#: grows about (1 + base) / 2 per retry: from 0.5 s with base 2.5, ten retries span
#: about 20-30 s (measured: 24 s; with 100 ms and base 2 they spanned only 1.6 s, too
#: short for a store restarting). A store that restarts or sheds load (503 SlowDown)
#: for seconds does not fail a save or a restore; a dead one is reported within that.
MAX_RETRIES = 10
RETRY_TIMEOUT = datetime.timedelta(seconds=60)
#: The construction probe must answer fast: a wrong endpoint is a typo, not an outage.
PROBE_RETRIES = 1
PROBE_TIMEOUT = datetime.timedelta(seconds=5)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,62}$")
_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
_SET_CREDENTIALS = (
    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
    "credentials) in the environment, or pass storage_options={'access_key_id': ..., "
    "'secret_access_key': ...}"
)


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://BUCKET/PREFIX`` root."""

    bucket: str
    prefix: str  # without leading or trailing '/', possibly empty

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, relkey: str) -> str:
        return f"{self.prefix}/{relkey}" if self.prefix else relkey


def parse_url(url: str) -> S3Location:
    """Split ``s3://BUCKET/PREFIX``; ``ConfigError`` for anything else."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ConfigError(
            f"Not an S3 root. Expected 's3://BUCKET/PREFIX'. Received: root={url!r}. "
            "Write the bucket name after 's3://'."
        )
    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    parts = prefix.split("/") if prefix else []
    bad = [p for p in parts if p in ("", ".", "..") or "\x00" in p or "\\" in p]
    if not _BUCKET_RE.match(bucket) or bad:
        raise ConfigError(
            f"Invalid S3 root. Expected 's3://BUCKET/PREFIX' with a valid bucket name and a "
            f"prefix without empty, '.' or '..' components. Received: root={url!r}. "
            "Fix the URL."
        )
    return S3Location(bucket, prefix)


def _normalise(options: Mapping[str, Any]) -> dict[str, Any]:
    """Option keys in obstore's lower-case form without the ``aws_`` prefix."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"storage_options keys must be strings. Received: key={key!r}. "
                "Use obstore's S3 configuration names, e.g. 'endpoint'."
            )
        name = key.lower()
        name = name[len("aws_") :] if name.startswith("aws_") else name
        if name == "endpoint_url":
            name = "endpoint"
        if name == "default_region":
            name = "region"
        out[name] = value
    return out


def resolve(options: Mapping[str, Any] | None, environ: Mapping[str, str]) -> dict[str, Any]:
    """The S3 configuration for obstore: environment first, ``storage_options`` over it.

    Raises ``StorageError`` (stage ``"config"``) when no credentials are found: without
    them obstore would ask the EC2 metadata service and hang on any other machine.
    """
    config: dict[str, Any] = {}
    env_names = {
        "AWS_ENDPOINT_URL": "endpoint",
        "AWS_ENDPOINT": "endpoint",
        "AWS_ACCESS_KEY_ID": "access_key_id",
        "AWS_SECRET_ACCESS_KEY": "secret_access_key",
        "AWS_SESSION_TOKEN": "session_token",
        "AWS_DEFAULT_REGION": "region",
        "AWS_REGION": "region",  # wins over AWS_DEFAULT_REGION, as in the AWS CLI
    }
    for env, name in env_names.items():
        if environ.get(env):
            config[name] = environ[env]
    config.update(_normalise(options or {}))
    skip = str(config.get("skip_signature", "")).lower() in ("1", "true", "yes")
    has_key = bool(config.get("access_key_id")) and bool(config.get("secret_access_key"))
    ambient = any(environ.get(v) for v in _CREDENTIAL_ENV[1:])
    if not (skip or has_key or ambient):
        found = sorted(k for k in ("access_key_id", "secret_access_key") if config.get(k))
        raise StorageError(
            "No S3 credentials found. Expected an access key id and a secret access key. "
            f"Received: only {found or 'none'} of them (environment and storage_options). "
            f"{_SET_CREDENTIALS}.",
            errno=errno.EACCES,
            stage="config",
        )
    config.setdefault("region", "us-east-1")
    return config


def client_options(config: Mapping[str, Any]) -> dict[str, Any]:
    endpoint = str(config.get("endpoint", ""))
    return {
        "allow_http": endpoint.startswith("http://"),
        "connect_timeout": "5s",
        "timeout": "300s",  # one multipart part on a slow link
    }


def retry_config(*, probe: bool = False) -> dict[str, Any]:
    return {
        "max_retries": PROBE_RETRIES if probe else MAX_RETRIES,
        "retry_timeout": PROBE_TIMEOUT if probe else RETRY_TIMEOUT,
        "backoff": {
            "init_backoff": datetime.timedelta(milliseconds=500),
            "max_backoff": datetime.timedelta(seconds=5),
            "base": 2.5,
        },
    }


def make_store(location: S3Location, config: Mapping[str, Any], *, probe: bool = False) -> Any:
    from obstore.store import S3Store

    try:
        return S3Store(
            location.bucket,
            config=dict(config),  # type: ignore[arg-type]
            client_options=client_options(config),  # type: ignore[arg-type]
            retry_config=retry_config(probe=probe),  # type: ignore[arg-type]
        )
    except Exception as exc:  # an unknown key, a malformed value
        raise ConfigError(
            f"obstore refused the S3 configuration: {exc}. Expected obstore's S3 configuration "
            f"keys. Received: storage_options keys={sorted(config)!r}. Fix the option named "
            "in the message."
        ) from exc


def translate(exc: BaseException, *, stage: str, key: str, location: S3Location) -> NoReturn:
    """Raise the safepoint error for an obstore exception ``exc`` (the one place that does).

    A missing object on a read stays ``FileNotFoundError`` (absence is an answer: no
    manifest means never committed); everything else is a ``StorageError`` naming the
    stage, the object and what to check.
    """
    import obstore.exceptions as oe

    where = f"s3://{location.bucket}/{key}"
    full = str(exc)
    text = full.split("\n", 1)[0].removesuffix('<?xml version="1.0" encoding="UTF-8"?>').strip()
    code = re.search(r"<Code>([^<]{1,80})</Code>", full)
    if code:
        text = f"{text} {code.group(1)}"
    denied = re.search(r"status code: 40[13]\b", full) is not None
    if isinstance(exc, SafepointError):
        raise exc
    if isinstance(exc, FileNotFoundError | oe.NotFoundError):  # obstore raises the former
        if "NoSuchBucket" in str(exc):
            raise _no_bucket(location, exc)
        raise FileNotFoundError(errno.ENOENT, f"No such object: {where}", where) from exc
    if "NoSuchBucket" in full:
        raise _no_bucket(location, exc)
    if isinstance(exc, oe.PermissionDeniedError | oe.UnauthenticatedError) or denied:
        raise StorageError(
            f"S3 refused stage {stage!r} on {where}: {text}. Expected credentials allowed to "
            f"read and write the bucket. Received: an access-denied answer. {_SET_CREDENTIALS}, "
            "and check that the key's policy covers this bucket.",
            errno=errno.EACCES,
            stage=stage,
        ) from exc
    if isinstance(exc, oe.AlreadyExistsError | oe.PreconditionError):
        raise StorageError(
            f"S3 stage {stage!r} on {where} lost a conditional write: {text}. Expected to be "
            "the only writer of this root. Received: the object changed under us (another "
            "writer). Make sure only one process saves to this root.",
            errno=errno.EEXIST,
            stage=stage,
        ) from exc
    hint = (
        "Check the endpoint (AWS_ENDPOINT_URL or storage_options['endpoint']) and the network"
        if isinstance(exc, oe.GenericError) and ("connect" in text.lower() or "dns" in text.lower())
        else "Check the endpoint, the network and the server's health"
    )
    raise StorageError(
        f"S3 stage {stage!r} on {where} failed after retries: {text}. {hint}; checkpoints "
        "committed before this one are intact.",
        errno=errno.EIO,
        stage=stage,
    ) from exc


def _no_bucket(location: S3Location, exc: BaseException) -> StorageError:
    err = StorageError(
        f"S3 bucket {location.bucket!r} does not exist. Expected an existing bucket. "
        f"Received: root={location.url!r}. Create the bucket first (safepoint never creates "
        "buckets) or fix the name in the root URL.",
        errno=errno.ENOENT,
        stage="config",
    )
    err.__cause__ = exc
    return err


def environ() -> Mapping[str, str]:
    return os.environ


__all__ = ["S3Location", "make_store", "parse_url", "resolve", "translate"]
