"""One writer per S3 root: a lease object taken with a conditional create, kept alive, expiring.

An object store has no ``flock`` and no process that dies with its holder, so the
writer lock is an object, ``PREFIX/.sp-lease.json``, holding the writer's random token,
host, pid and time to live:

- **take**: ``PUT`` with ``If-None-Match: *``. Exactly one of two racing writers gets it.
- **busy**: if the object exists, its age is measured on the *server's* clock (its
  ``Last-Modified`` against that of an object written just now), so the writers'
  clocks never matter. Younger than its time to live (plus one second, the resolution
  of ``Last-Modified``): the root is refused with a ``StorageError`` naming the lease,
  its holder and when it expires.
- **take over**: an expired lease (a crashed writer) is replaced with ``If-Match`` on
  the ETag that was read, so two writers taking over at once cannot both win. A lease
  whose holder provably died is taken over at once, without waiting for it to expire:
  same kernel boot and pid namespace as ours (so its pid means the same process), and
  that pid gone or now another process (a different start time). A job restarted on
  the machine where it was killed saves at once; one restarted elsewhere waits.
- **keep**: a daemon thread renews it (``If-Match`` on our own last ETag) every third
  of its time to live; a failed renewal marks the lease lost, and the next commit
  refuses to run (:meth:`Lease.check` renews synchronously first).
- **release**: delete it (after checking that it is still ours).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from safepoint.errors import StorageError
from safepoint.storage.s3.client import S3Client

log = logging.getLogger("safepoint")

LEASE_KEY = ".sp-lease.json"
DEFAULT_TTL = 60.0
_MAX_LEASE = 64 << 10


class Lease:
    """The writer lease of one S3 root, held by this process while ``held``."""

    def __init__(self, client: S3Client, *, ttl: float = DEFAULT_TTL) -> None:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive. Received: ttl={ttl!r}.")
        self.client = client
        self.ttl = float(ttl)
        self.token = secrets.token_hex(16)
        self._etag: str | None = None
        self._lost: StorageError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    @property
    def held(self) -> bool:
        return self._etag is not None and self._lost is None

    def _body(self) -> bytes:
        fields = {
            "safepoint": 1,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **_process_identity(os.getpid()),
            "ttl": self.ttl,
            "renewed": round(time.time(), 3),
        }
        return json.dumps(fields, sort_keys=True).encode()

    # -- taking and releasing ----------------------------------------------------------
    def acquire(self) -> None:
        if self.held:
            return
        self._lost = None
        try:
            result = self.client.put(LEASE_KEY, self._body(), stage="lease", mode="create")
        except StorageError as exc:
            if exc.errno != errno.EEXIST:
                raise
            result = self._take_over()
        self._etag = result["e_tag"]
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, name="safepoint-s3-lease", daemon=True)
        self._thread.start()

    def _take_over(self) -> dict[str, Any]:
        try:
            data, meta, _ = self.client.get(LEASE_KEY, stage="lease")
        except FileNotFoundError:  # released between our create and this read: try again
            return self.client.put(LEASE_KEY, self._body(), stage="lease", mode="create")
        holder = _parse(data)
        ttl = (
            float(holder.get("ttl", DEFAULT_TTL))
            if isinstance(holder.get("ttl"), int | float)
            else DEFAULT_TTL
        )
        age = (self.client.server_now() - meta["last_modified"]).total_seconds()
        if age <= ttl + 1.0 and not _holder_died(holder):
            raise StorageError(
                f"The S3 root {self.client.location.url!r} is leased by another writer "
                f"(lease object {self.client.url(LEASE_KEY)}: host={holder.get('host')!r}, "
                f"pid={holder.get('pid')!r}, renewed {age:.0f} s ago, expires after {ttl:.0f} s "
                "without renewal). Expected no live writer. Received: a live lease. "
                + (
                    "That writer is this very process, through another storage object (a "
                    "root spelled differently: another endpoint string, an S3Storage next to "
                    "a URL): give every manager and callback of this root the same s3:// URL "
                    "and storage_options, so that they share the lease."
                    if _is_us(holder)
                    else "Stop the other writer, or wait for its lease to expire if it crashed."
                ),
                errno=errno.EBUSY,
                stage="lock",
            )
        log.warning(
            "safepoint: taking over the S3 lease %s of a writer that %s (host=%r pid=%r, "
            "%.0f s old)",
            self.client.url(LEASE_KEY),
            "expired" if age > ttl + 1.0 else "died on this machine",
            holder.get("host"),
            holder.get("pid"),
            age,
        )
        try:
            return self.client.put(
                LEASE_KEY, self._body(), stage="lease", mode={"e_tag": meta["e_tag"]}
            )
        except StorageError as exc:
            raise StorageError(
                f"Another writer took over the expired S3 lease {self.client.url(LEASE_KEY)} "
                "first. Expected to be the only writer taking it over. Received: a lost "
                "conditional write. Stop the other writer before saving to this root.",
                errno=errno.EBUSY,
                stage="lock",
            ) from exc

    def release(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._mutex:
            etag, self._etag = self._etag, None
        if etag is None or self._lost is not None:
            return
        try:
            # Best effort, with short retries: an unreleased lease expires on its own,
            # and a process exiting after its store went away must not wait for it.
            if self.client.head(LEASE_KEY, stage="lease", quick=True)["e_tag"] == etag:
                self.client.delete([LEASE_KEY], stage="lease", quick=True)
        except (StorageError, FileNotFoundError) as exc:  # it expires on its own
            log.warning("safepoint: could not release the S3 lease: %s", exc)

    # -- keeping it --------------------------------------------------------------------
    def renew(self) -> None:
        with self._mutex:
            if self._lost is not None:
                raise self._lost
            if self._etag is None:
                raise StorageError(
                    f"The S3 lease {self.client.url(LEASE_KEY)} is not held. Expected lock() "
                    "before writing. Received: a write without the lease. Call lock() first.",
                    stage="lock",
                )
            try:
                result = self.client.put(
                    LEASE_KEY, self._body(), stage="lease", mode={"e_tag": self._etag}
                )
            except StorageError as exc:
                if exc.errno == errno.EEXIST:  # the ETag changed: someone else holds it now
                    self._lost = StorageError(
                        f"The S3 lease {self.client.url(LEASE_KEY)} was taken over by another "
                        "writer (ours expired: the process stalled longer than its time to "
                        f"live, {self.ttl:.0f} s). Expected to hold it. Received: a changed "
                        "lease. Nothing more is committed by this writer; restart it.",
                        errno=errno.EBUSY,
                        stage="lock",
                    )
                    raise self._lost from exc
                raise
            self._etag = result["e_tag"]

    def check(self) -> None:
        """Renew now: a commit runs only while the lease is provably ours."""
        self.renew()

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except StorageError as exc:
                if self._lost is not None:
                    log.error("safepoint: %s", exc)
                    return
                log.warning("safepoint: renewing the S3 lease failed (retrying): %s", exc)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(4096).strip()
    except OSError:
        return None


def _is_us(holder: dict[str, Any]) -> bool:
    """Whether the lease ``holder`` describes this very process (same machine, same
    process since boot)."""
    if holder.get("host") != socket.gethostname() or holder.get("pid") != os.getpid():
        return False
    ident = _process_identity(os.getpid())
    return all(holder.get(k) == v for k, v in ident.items())


def _process_identity(pid: int) -> dict[str, Any]:
    """What names process ``pid`` uniquely on this machine since boot (Linux): the boot
    id, the pid namespace and the process's start time. Empty where /proc has none."""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return {}
    stat = _read_text(f"/proc/{pid}/stat")
    if boot is None or stat is None:
        return {}
    # Field 22 (starttime) comes after the command name, which may hold spaces: split
    # after its closing parenthesis.
    fields = stat.rpartition(")")[2].split()
    return {"boot": boot, "pidns": pidns, "start": fields[19] if len(fields) > 19 else None}


def _holder_died(holder: dict[str, Any]) -> bool:
    """Whether the lease's holder is provably dead: it ran under this kernel boot and
    pid namespace, and its pid is gone or names a process started at another time.

    Any doubt (another machine or container, no /proc, a lease written by an older
    safepoint) is not proof: the lease is then left to expire.
    """
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    ours = _process_identity(os.getpid())
    if not ours or holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot") != ours["boot"] or holder.get("pidns") != ours["pidns"]:
        return False
    if holder.get("start") is None:
        return False
    now = _process_identity(pid)
    return not now or now.get("start") != holder["start"]


def _parse(data: bytes) -> dict[str, Any]:
    if len(data) > _MAX_LEASE:
        return {}
    try:
        found = json.loads(data)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def lost_race(root: str, name: str, exc: StorageError) -> StorageError:
    """What a commit that lost its conditional write raises (another writer committed)."""
    if exc.errno != errno.EEXIST:
        return exc
    return StorageError(
        f"Checkpoint {name!r} in {root!r} was committed by another save while this "
        "one was in flight. Expected to be the only writer. Received: a conditional write "
        "that lost (the other checkpoint was kept, this save was discarded). Make sure only "
        "one process saves to this root.",
        errno=errno.EEXIST,
        stage="manifest",
    )


__all__ = ["LEASE_KEY", "Lease", "lost_race"]
