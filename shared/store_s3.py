"""S3 backend of the checkpoint store (AWS S3, SeaweedFS, MinIO, any S3-compatible server).

Same keys and the same guarantees as :class:`shared.store.LocalStore`::

    s3://<bucket>/<prefix>/ckpt/<key>/<file>          shards, config, tokenizer ...
    s3://<bucket>/<prefix>/ckpt/<key>/manifest.json   written LAST: the commit marker
    s3://<bucket>/<prefix>/results/<key>.json         small JSON documents

Why the manifest is the commit marker here too: S3 has no rename and no
multi-object transaction, but a single PUT is atomic and reads after a PUT are
strongly consistent (AWS since 2020, SeaweedFS, MinIO).  So a writer uploads
every file first and the manifest (each file's size and sha256) last; a writer
killed at any earlier point leaves objects that no reader trusts, and the next
writer of the key simply overwrites them.  Because keys are content addressed,
two writers of one key upload identical bytes, so overwriting is harmless and
"first committed manifest wins" needs no locking.

Each file's sha256 is computed in a thread while the same file is uploaded
(multipart, parallel parts), so verification costs no extra wall time when the
network is the bottleneck; a file whose size or mtime changes during the
upload aborts the commit.  Transport integrity of every part is checked by S3
itself (botocore sends CRC32 checksums that the server validates).  Readers download into a local cache folder, verify every
file against the manifest (size, then sha256) and remember the verification
like ``LocalStore`` does, so a second read on the same machine costs one GET
of the manifest and a few ``stat`` calls.

Credentials never come from the store URI or a pipeline spec: boto3's standard
chain is used (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` and the shared config files, web identity / IRSA in a cluster,
instance metadata).  See docs/s3.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from s3transfer.exceptions import RetriesExceededError

from shared.store import (
    MANIFEST,
    MANIFEST_FORMAT,
    VERIFIED_STAMP,
    NOT_FOUND_CAUSES,
    CheckpointNotFound,
    CorruptCheckpoint,
    Store,
    StoreError,
    canonical_json,
    CorruptDocument,
    contained_path,
    seal_json,
    unseal_json,
    sha256_file,
    validate_manifest,
    verify_policy,
)

MB = 1024 * 1024
log = logging.getLogger("lmcompose")

# Error codes that mean "who you are / what you may do" rather than "what is stored".
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "403",
    "Forbidden",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_CONNECTION_ERRORS = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)

CREDENTIAL_HINT = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), "
    "or AWS_PROFILE and its entry in ~/.aws/credentials, and that this identity may read and write the bucket"
)
ENDPOINT_HINT = (
    "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (unset for AWS itself), that the server is running and "
    "reachable from here, and AWS_REGION / AWS_DEFAULT_REGION"
)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise StoreError(f"{name}={value!r} is not an integer") from exc


def default_transfer_config() -> TransferConfig:
    """Multipart settings for multi-GB safetensors shards (overridable through environment variables).

    * 64 MiB parts: a 5 GB shard is ~80 parts (S3 allows 10 000), few enough
      requests that per-request latency does not matter, small enough that a
      retried part costs little.
    * 8 parallel parts per file: saturates a 10 Gb/s link to S3 or a
      cluster-local SeaweedFS without starving the node's CPU.
    * Everything below 64 MiB (config, tokenizer, small shards) is one PUT.
    """
    chunk = _env_int("LMCOMPOSE_S3_CHUNK_MB", 64) * MB
    concurrency = _env_int("LMCOMPOSE_S3_CONCURRENCY", 8)
    config = TransferConfig(
        multipart_threshold=_env_int("LMCOMPOSE_S3_MULTIPART_THRESHOLD_MB", 64) * MB,
        multipart_chunksize=chunk,
        max_concurrency=concurrency,
        io_chunksize=1 * MB,
        use_threads=True,
        preferred_transfer_client="classic",  # deterministic behaviour with or without awscrt installed
    )
    return config


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError as exc:
        raise StoreError(f"{name}={value!r} is not a number") from exc
    if number <= 0:
        raise StoreError(f"{name}={value!r} must be positive")
    return number


@dataclass(frozen=True)
class StoreDeadlines:
    """How long the S3 store waits for a server before it gives up (one policy for every request).

    * ``connect_s`` -- opening a TCP connection (default 5 s).
    * ``probe_s`` x ``probe_attempts`` -- the first request of a store object
      (bucket check) and lookups of single objects; an endpoint that accepts
      connections but never answers fails here after about
      ``probe_attempts x (connect_s + probe_s)`` = 2 x 15 s by default, with
      an error naming the endpoint.  Without this, the data-transfer timeouts
      below allow 8 x 120 s = 16 min of silence.
    * ``read_s`` -- any later read of a response (large parts on a busy
      server may take long; default 120 s), retried ``LMCOMPOSE_S3_MAX_ATTEMPTS`` times.

    Environment: ``LMCOMPOSE_S3_CONNECT_TIMEOUT``, ``LMCOMPOSE_S3_PROBE_TIMEOUT``,
    ``LMCOMPOSE_S3_PROBE_ATTEMPTS``, ``LMCOMPOSE_S3_READ_TIMEOUT`` (seconds).
    """

    connect_s: float = 5.0
    probe_s: float = 10.0
    probe_attempts: int = 2
    read_s: float = 120.0

    @classmethod
    def from_env(cls) -> "StoreDeadlines":
        return cls(
            connect_s=_env_float("LMCOMPOSE_S3_CONNECT_TIMEOUT", cls.connect_s),
            probe_s=_env_float("LMCOMPOSE_S3_PROBE_TIMEOUT", cls.probe_s),
            probe_attempts=max(1, _env_int("LMCOMPOSE_S3_PROBE_ATTEMPTS", cls.probe_attempts)),
            read_s=_env_float("LMCOMPOSE_S3_READ_TIMEOUT", cls.read_s),
        )

    def first_contact_s(self) -> float:
        """Worst-case seconds before an unresponsive endpoint is reported."""
        return self.probe_attempts * (self.connect_s + self.probe_s)


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _stat_sig(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _client_error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> (``bucket``, ``some/prefix``)."""
    from shared.store import redact_uri

    parsed = urlparse(uri)
    shown = redact_uri(uri.split("?")[0].split("#")[0])  # never repeat a secret in an error
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an S3 store URI: {shown!r} (expected s3://bucket/prefix)")
    if parsed.query or parsed.fragment or "@" in parsed.netloc:
        # credentials or options in the URI would end up in pipeline specs and logs
        raise StoreError(f"S3 store URI {shown!r} must be plain s3://bucket/prefix; credentials come from the environment")
    bucket = parsed.netloc
    prefix = parsed.path.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise StoreError(f"invalid prefix in S3 store URI {shown!r}")
    return bucket, prefix


class S3Store(Store):
    """A checkpoint store in an S3 bucket under a prefix (``s3://bucket/prefix``).

    Endpoint, region and credentials come from the environment (standard AWS
    variables, ``AWS_PROFILE``), or from the explicit ``endpoint_url`` /
    ``region`` / ``profile`` arguments -- never from the URI.  ``cache_dir``
    is where verified checkpoints are downloaded to (default
    ``$LMCOMPOSE_CACHE/s3/<bucket>/<prefix>``, ``$LMCOMPOSE_CACHE`` defaulting
    to ``~/.cache/lm-compose``).  ``create_bucket=True`` creates a missing
    bucket (tests, ``make`` targets); otherwise a missing bucket is an error.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        cache_dir: Path | str | None = None,
        create_bucket: bool = False,
        retry_mode: str | None = None,
        max_attempts: int | None = None,
        transfer_config: TransferConfig | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        self.create_bucket = create_bucket
        self.transfer_config = transfer_config or default_transfer_config()
        try:
            session = boto3.Session(profile_name=profile or os.environ.get("AWS_PROFILE") or None)
        except ProfileNotFound as exc:
            raise StoreError(f"AWS profile not found ({exc}); check AWS_PROFILE and ~/.aws/config") from exc
        self.region = region or session.region_name or "us-east-1"
        retries = {
            "mode": retry_mode or os.environ.get("LMCOMPOSE_S3_RETRY_MODE", "adaptive"),
            "max_attempts": max_attempts or _env_int("LMCOMPOSE_S3_MAX_ATTEMPTS", 8),
        }
        self.deadlines = StoreDeadlines.from_env()
        addressing = {"addressing_style": "path" if self.endpoint_url else "auto"}
        config = Config(
            retries=retries,  # throttling (SlowDown, 503), 5xx and connection errors are retried with backoff
            connect_timeout=self.deadlines.connect_s,
            read_timeout=self.deadlines.read_s,
            max_pool_connections=max(16, 2 * self.transfer_config.max_request_concurrency),
            # path-style URLs for custom endpoints: SeaweedFS/MinIO do not resolve bucket.host names
            s3=addressing,
        )
        self._client = session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        # first contact and lookups of small objects use short timeouts and few attempts: an endpoint
        # that accepts connections but never answers must fail in seconds, not after attempts x 120 s
        probe = Config(
            retries={"mode": "standard", "max_attempts": self.deadlines.probe_attempts},
            connect_timeout=self.deadlines.connect_s,
            read_timeout=self.deadlines.probe_s,
            s3=addressing,
        )
        self._probe = session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=probe)
        self._session = session
        if cache_dir is None:
            # the same cache root as shared.models (converted base models)
            base = os.environ.get("LMCOMPOSE_CACHE") or str(Path.home() / ".cache" / "lm-compose")
            cache_dir = Path(base).expanduser() / "s3" / self.bucket / self.prefix
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self._bucket_ok = False

    # -- naming and errors ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint_url or 'AWS'})"

    def _object(self, key: str) -> str:
        if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
            raise StoreError(f"invalid store key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"{self.uri} at {self.endpoint_url or 'AWS S3'}"

    def _redact(self, text: str) -> str:
        """Remove the secret (and the access key id) from a server message, should a server echo them."""
        try:
            creds = self._session.get_credentials()
            frozen = creds.get_frozen_credentials() if creds else None
        except Exception:  # noqa: BLE001 - redaction must never raise
            frozen = None
        for secret in (getattr(frozen, "secret_key", None), getattr(frozen, "token", None), getattr(frozen, "access_key", None)):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _credential_source(self) -> str:
        try:
            creds = self._session.get_credentials()
        except Exception:  # noqa: BLE001
            return "unknown"
        return getattr(creds, "method", "none") if creds else "none found"

    def _translate(self, exc: Exception, action: str) -> StoreError:
        """Map a boto3/botocore error to a StoreError that says what to check (never the secret)."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"{action}: no usable AWS credentials for {self._where()}; {CREDENTIAL_HINT}")
        if isinstance(exc, ReadTimeoutError):
            return StoreError(
                f"{action}: the S3 endpoint {self.endpoint_url or 'AWS S3'} accepted the connection but did not "
                f"answer in time (store {self.uri}); is it an S3 server, and is it healthy? {ENDPOINT_HINT}; "
                "timeouts: LMCOMPOSE_S3_PROBE_TIMEOUT / LMCOMPOSE_S3_READ_TIMEOUT"
            )
        if isinstance(exc, _CONNECTION_ERRORS):
            return StoreError(f"{action}: cannot reach the S3 endpoint for {self._where()} ({type(exc).__name__}); {ENDPOINT_HINT}")
        if isinstance(exc, ClientError):
            code = _client_error_code(exc)
            message = self._redact(str(exc.response.get("Error", {}).get("Message", "")))
            if code in _AUTH_CODES:
                return StoreError(
                    f"{action}: S3 refused the request to {self._where()} ({code}: {message}); "
                    f"credentials source: {self._credential_source()}; {CREDENTIAL_HINT}"
                )
            if code in _NO_BUCKET_CODES:
                return StoreError(
                    f"{action}: bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS S3'}; "
                    "create it (aws s3 mb, or S3Store(..., create_bucket=True)) or fix the store URI"
                )
            return StoreError(f"{action}: S3 error on {self._where()} ({code}: {message})")
        if isinstance(exc, BotoCoreError):
            return StoreError(f"{action}: S3 client error on {self._where()}: {self._redact(str(exc))}")
        return StoreError(f"{action}: {type(exc).__name__}: {self._redact(str(exc))}")

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, action) from None  # the boto chain can carry request details
        except RetriesExceededError as exc:  # s3transfer gave up on a download's body reads
            raise self._translate(exc.last_exception or exc, action) from None

    def _ensure_bucket(self) -> None:
        """Check once per store object that the bucket is reachable, so errors name the real cause."""
        if self._bucket_ok:
            return
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _client_error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                if not self.create_bucket:
                    raise self._translate(
                        ClientError({"Error": {"Code": "NoSuchBucket", "Message": ""}}, "HeadBucket"), "open store"
                    ) from None
                self._create_bucket()
            elif code in _AUTH_CODES:
                # HEAD responses carry no error body ("403"): a GET-type call names the real cause
                # (InvalidAccessKeyId vs SignatureDoesNotMatch vs AccessDenied)
                with self._errors("open store"):
                    self._probe.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
                # listing is allowed although HEAD is not (a narrow bucket policy): usable
            else:
                raise self._translate(exc, "open store") from None
        except BotoCoreError as exc:
            raise self._translate(exc, "open store") from None
        self._bucket_ok = True

    def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1" and not self.endpoint_url:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if _client_error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._translate(exc, f"create bucket {self.bucket}") from None

    def _transfers(self) -> Any:
        """A transfer manager for one put/get (threads live only as long as the operation).

        Use it as a context manager: on an exception its exit cancels the
        remaining transfers and waits for their threads before files are closed.
        """
        return create_transfer_manager(self._client, self.transfer_config)

    # -- small objects -------------------------------------------------------------------------------

    def _get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None if it does not exist."""
        name = self._object(key)
        self._ensure_bucket()
        try:
            return self._client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except ClientError as exc:
            if _client_error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise self._translate(exc, f"read {key}") from None
        except BotoCoreError as exc:
            raise self._translate(exc, f"read {key}") from None

    def delete_json(self, key: str) -> None:
        """Remove a JSON document (the writability probe); missing is fine."""
        with self._errors(f"delete {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def put_json(self, key: str, obj: Any) -> None:
        """One PUT: S3 replaces an object atomically, so readers see the old or the new document."""
        name = self._object(key)
        body = seal_json(obj)
        self._ensure_bucket()
        with self._errors(f"write {key}"):
            self._client.put_object(Bucket=self.bucket, Key=name, Body=body, ContentType="application/json")

    def _load_json(self, key: str) -> Any:
        """The verified document or None; a corrupt one is kept under ``quarantine/``, deleted, and counts as missing."""
        data = self._get_bytes(key)
        if data is None:
            return None
        try:
            return unseal_json(data, key)
        except CorruptDocument as exc:
            record = f"quarantine/{key.replace('/', '-')}-{uuid.uuid4().hex[:6]}"
            with self._errors(f"quarantine {key}"):
                self._client.put_object(Bucket=self.bucket, Key=self._object(record), Body=data)
                self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
            log.warning("%s; quarantined to %s/%s, so it is computed again", exc, self.uri, record)
            return None

    def get_json(self, key: str) -> Any:
        obj = self._load_json(key)
        if obj is None:
            raise KeyError(f"{key} not in {self.uri}")
        return obj

    def object_version(self, key: str) -> tuple[int, str] | None:
        """(size, ETag) of the object at ``key`` under the prefix, or None if there is none.

        No bucket check first: a reader of a gated data set may hold
        ``s3:GetObject`` on it and nothing else.
        """
        name = self._object(key)
        with self._errors(f"look up {self.uri}/{key}"):
            try:
                head = self._probe.head_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _client_error_code(exc) in _NOT_FOUND_CODES:
                    return None
                raise
        return int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')

    def list_prefix(self) -> list[tuple[str, int, str]]:
        """``[(name relative to the prefix, size, ETag)]`` of every object under this store's prefix.

        Used for model folders kept in a bucket (``s3://bucket/models/llama``):
        their identity and their download.  Hidden names and folder markers
        are skipped.
        """
        self._ensure_bucket()
        start = f"{self.prefix}/" if self.prefix else ""
        out = []
        with self._errors(f"list {self.uri}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(start):]
                    if not rel or rel.endswith("/") or any(p.startswith(".") or not p for p in rel.split("/")):
                        continue
                    out.append((rel, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
        return sorted(out)

    def download_object(self, key: str, dest: Path) -> tuple[int, str]:
        """Download one object to ``dest`` atomically; return its (size, ETag).

        The body goes to a hidden temporary file beside ``dest`` and is renamed
        into place only when complete and of the advertised size, so a killed
        download never leaves a truncated ``dest`` that a later reader trusts.
        The object is pinned by ETag (``IfMatch``) so a concurrent overwrite is
        an error, not a mix of two versions.
        """
        version = self.object_version(key)
        if version is None:
            raise CheckpointNotFound(f"{self.uri}/{key} does not exist")
        size, etag = version
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            extra = {"IfMatch": etag} if etag else {}
            with self._errors(f"download {self.uri}/{key}"), open(tmp, "wb") as fh:
                body = self._client.get_object(Bucket=self.bucket, Key=self._object(key), **extra)["Body"]
                for chunk in body.iter_chunks(chunk_size=8 * MB):
                    fh.write(chunk)
            if tmp.stat().st_size != size:
                raise StoreError(f"download of {self.uri}/{key} has {tmp.stat().st_size} bytes, expected {size}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return size, etag

    def has_json(self, key: str) -> bool:
        """True for a present document whose digest verifies (one GET; a corrupt one is quarantined: False)."""
        return self._load_json(key) is not None

    # -- manifests -----------------------------------------------------------------------------------

    def _read_manifest(self, key: str) -> dict[str, Any]:
        data = self._get_bytes(f"{key}/{MANIFEST}")
        if data is None:
            raise CheckpointNotFound(f"no committed checkpoint {key} in {self.uri}; {NOT_FOUND_CAUSES}")
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpoint(f"{key}: manifest is not valid JSON ({exc})") from exc
        # every name is checked before one byte is written: a name like /home/u/.bashrc or ../../x
        # in a manifest someone put into the bucket must not become a path on this machine
        return validate_manifest(manifest, key)

    def has_checkpoint(self, key: str) -> bool:
        """True if a valid manifest exists.

        Unlike a missing or broken manifest, an S3 access or connection error
        is raised: answering False would make the caller recompute a step and
        then fail on the write, hiding the real problem.
        """
        try:
            self._read_manifest(key)
            return True
        except (CheckpointNotFound, CorruptCheckpoint):
            return False

    def checkpoint_meta(self, key: str) -> dict[str, Any]:
        return self._read_manifest(key)["meta"]

    # -- writing a checkpoint ------------------------------------------------------------------------

    def put_checkpoint(self, key: str, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Upload every file of ``folder``, then the manifest; return the committed manifest.

        If a committed manifest already exists it is kept and returned (same
        key, same content).  ``folder`` is left as it is.
        """
        folder = Path(folder)
        prefix = self._object(key)
        try:
            return self._read_manifest(key)
        except (CheckpointNotFound, CorruptCheckpoint):
            pass
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, VERIFIED_STAMP))
        if not paths:
            raise StoreError(f"refusing to write an empty checkpoint for {key}")
        json.dumps(meta)  # fail before uploading gigabytes if meta cannot be stored
        files: dict[str, dict[str, Any]] = {}
        before = {path: _stat_sig(path) for path in paths}
        # hashing (from the page cache, in parallel threads: hashlib releases the GIL) overlaps the upload
        with self._errors(f"upload checkpoint {key}"), ThreadPoolExecutor(
            max_workers=min(4, len(paths)), thread_name_prefix="lmc-sha256"
        ) as hashers, self._transfers() as manager:  # its exit cancels the other transfers when one fails
            digests = {path: hashers.submit(sha256_file, path) for path in paths}
            uploads = {path: manager.upload(str(path), self.bucket, f"{prefix}/{_rel(path, folder)}") for path in paths}
            for path in paths:
                uploads[path].result()
                digest = digests[path].result()
                if _stat_sig(path) != before[path]:
                    raise StoreError(f"{key}: {_rel(path, folder)} changed while it was being uploaded; nothing committed")
                files[_rel(path, folder)] = {"size": before[path][0], "sha256": digest}
            # what S3 now holds has the sizes we sent (a cheap HEAD per file, before committing)
            for rel, info in files.items():
                head = self._client.head_object(Bucket=self.bucket, Key=f"{prefix}/{rel}")
                if head["ContentLength"] != info["size"]:
                    raise CorruptCheckpoint(
                        f"{key}: uploaded {rel} has {head['ContentLength']} bytes in S3, sent {info['size']}"
                    )
        manifest = {"format": MANIFEST_FORMAT, "key": key, "created": time.time(), "files": files, "meta": meta}
        return self._commit(key, manifest)

    def _commit(self, key: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest unless one is already committed (conditional PUT where the server supports it).

        ``If-None-Match: *`` makes "first committed manifest wins" atomic on
        servers that implement it (AWS S3, recent MinIO/SeaweedFS); on servers
        that ignore it two racing writers both commit, and since they uploaded
        identical files either manifest verifies.
        """
        name = self._object(f"{key}/{MANIFEST}")
        body = seal_json(manifest)  # the manifest's own digest: a changed parameter is caught too
        with self._errors(f"commit checkpoint {key}"):
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=name, Body=body, ContentType="application/json", IfNoneMatch="*"
                )
                return manifest
            except ClientError as exc:
                if _client_error_code(exc) not in _PRECONDITION_CODES:
                    raise
            try:
                return self._read_manifest(key)  # another writer committed first: keep theirs
            except (CheckpointNotFound, CorruptCheckpoint):
                # an invalid manifest blocked the conditional PUT: it never committed anything, replace it
                self._client.put_object(Bucket=self.bucket, Key=name, Body=body, ContentType="application/json")
                return manifest

    # -- reading a checkpoint ------------------------------------------------------------------------

    def _cache_folder(self, key: str) -> Path:
        self._object(key)  # validates the key
        return self.cache_dir / key

    @staticmethod
    def _stamp(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        stamp: dict[str, Any] = {"manifest_sha256": hashlib.sha256(canonical_json(manifest).encode()).hexdigest(), "files": {}}
        for rel in manifest["files"]:
            try:
                st = contained_path(folder, rel).stat()
            except FileNotFoundError:
                stamp["files"][rel] = None
                continue
            stamp["files"][rel] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return stamp

    @staticmethod
    def _matches(path: Path, info: dict[str, Any]) -> bool:
        try:
            return path.stat().st_size == info["size"] and sha256_file(path) == info["sha256"]
        except FileNotFoundError:
            return False

    def get_checkpoint(self, key: str) -> tuple[Path, dict[str, Any]]:
        """Download (or reuse) a verified local copy of a committed checkpoint.

        The cache folder is reused when its remembered verification matches
        the current manifest and the files' (size, mtime, inode); otherwise
        files that already match their digest are kept and the rest are
        downloaded to hidden temporary names, verified, and renamed into place
        one by one, so a concurrent reader of the same cache only ever sees
        complete files.  A file that does not match the manifest raises
        :class:`CorruptCheckpoint` naming it, and is not kept.
        """
        manifest = self._read_manifest(key)
        folder = self._cache_folder(key)
        stamp_path = folder / VERIFIED_STAMP
        if verify_policy() == "stat":
            try:
                if json.loads(stamp_path.read_text()) == self._stamp(folder, manifest):
                    return folder, manifest
            except (OSError, json.JSONDecodeError):
                pass
        # default: every cached file is hashed; one that rotted in the cache is simply downloaded again
        folder.mkdir(parents=True, exist_ok=True)
        self._sweep_partials(folder)
        prefix = self._object(key)
        todo = [
            (rel, info) for rel, info in manifest["files"].items() if not self._matches(contained_path(folder, rel), info)
        ]
        pending: list[tuple[str, dict[str, Any], Path, Any, Any]] = []

        def finished(future: Any, fh: Any, tmp: Path) -> tuple[int, str]:
            # runs in a hashing thread: waits for one download, then hashes it while others still download
            future.result()
            fh.close()
            return tmp.stat().st_size, sha256_file(tmp)

        try:
            with self._errors(f"download checkpoint {key}"), ThreadPoolExecutor(
                max_workers=max(1, min(4, len(todo))), thread_name_prefix="lmc-sha256"
            ) as hashers, self._transfers() as manager:
                for rel, info in todo:
                    dest = contained_path(folder, rel, f"{key}: manifest entry")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
                    fh = open(tmp, "wb")
                    future = manager.download(self.bucket, f"{prefix}/{rel}", fh)
                    pending.append((rel, info, tmp, fh, hashers.submit(finished, future, fh, tmp)))
                for rel, info, tmp, _fh, checked in pending:
                    try:
                        size, digest = checked.result()
                    except ClientError as exc:
                        if _client_error_code(exc) in _NOT_FOUND_CODES:
                            raise self._corrupt(key, f"{key}: file {rel} listed in the manifest is missing") from None
                        raise
                    if size != info["size"]:
                        raise self._corrupt(key, f"{key}: file {rel} has {size} bytes, manifest says {info['size']}")
                    if digest != info["sha256"]:
                        raise self._corrupt(key, f"{key}: file {rel} does not match its sha256 in the manifest")
                    os.replace(tmp, contained_path(folder, rel))
        finally:
            for _rel, _info, tmp, fh, _checked in pending:
                fh.close()
                tmp.unlink(missing_ok=True)
        tmp_stamp = stamp_path.with_name(f".{VERIFIED_STAMP}.{uuid.uuid4().hex}")
        try:
            tmp_stamp.write_text(json.dumps(self._stamp(folder, manifest)))
            os.replace(tmp_stamp, stamp_path)
        except OSError:  # read-only cache: verify every time
            tmp_stamp.unlink(missing_ok=True)
        return folder, manifest

    # -- leases ----------------------------------------------------------------------------------------

    def _lease(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        name = self._object(key)
        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _client_error_code(exc) in _NOT_FOUND_CODES:
                return None, None
            raise self._translate(exc, f"read lease {key}") from None
        except BotoCoreError as exc:
            raise self._translate(exc, f"read lease {key}") from None
        try:
            doc = json.loads(obj["Body"].read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = {}
        return (doc if isinstance(doc, dict) else {}), str(obj.get("ETag", ""))

    def acquire_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        """``If-None-Match: *`` PUT: atomic where the server supports conditional writes (AWS, recent SeaweedFS/MinIO)."""
        name = self._object(key)
        self._ensure_bucket()
        for _attempt in range(2):
            body = json.dumps({"owner": owner, "expires": time.time() + ttl_s}).encode()
            try:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=body, IfNoneMatch="*",
                                        ContentType="application/json")
                return True
            except ClientError as exc:
                if _client_error_code(exc) not in _PRECONDITION_CODES:
                    raise self._translate(exc, f"take lease {key}") from None
            doc, _etag = self._lease(key)
            if doc is None:
                continue  # released in between
            if doc.get("expires", 0) > time.time():
                return False
            with self._errors(f"expire lease {key}"):  # the holder is gone: remove its lease, try again
                self._client.delete_object(Bucket=self.bucket, Key=name)
        return False

    def lease_holder(self, key: str) -> str | None:
        doc, _etag = self._lease(key)
        return doc.get("owner") if doc and doc.get("expires", 0) > time.time() else None

    def renew_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        doc, _etag = self._lease(key)
        if not doc or doc.get("owner") != owner:
            return False
        self.put_json(key, {"owner": owner, "expires": time.time() + ttl_s})
        return True

    def release_lease(self, key: str, owner: str) -> None:
        doc, _etag = self._lease(key)
        if doc and doc.get("owner") == owner:
            with self._errors(f"release lease {key}"):
                self._client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def _corrupt(self, key: str, message: str) -> CorruptCheckpoint:
        """Quarantine ``key`` (the bucket's copy does not match its manifest) and describe it."""
        where = self.quarantine(key, message)
        return CorruptCheckpoint(f"{message}; quarantined to {where} -- re-run to recompute it")

    def quarantine(self, key: str, reason: str) -> str:
        """Keep the manifest under ``quarantine/`` and delete it from the key: the step is no longer committed."""
        try:
            manifest = self._read_manifest(key)
        except (CheckpointNotFound, CorruptCheckpoint):
            return "(already gone)"
        record = f"quarantine/{key.replace('/', '-')}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
        self.put_json(record, {"key": key, "reason": reason, "time": time.time(), "manifest": manifest})
        with self._errors(f"quarantine {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._object(f"{key}/{MANIFEST}"))
        return f"{self.uri}/{record}"

    @staticmethod
    def _sweep_partials(folder: Path, older_than_s: float = 6 * 3600) -> None:
        """Delete ``.part`` files left by readers killed mid-download (old enough not to be in flight)."""
        cutoff = time.time() - older_than_s
        for part in folder.rglob(".*.part"):
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
            except OSError:
                pass
