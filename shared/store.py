"""Content-addressed checkpoint and result store.

Layout under a store root (a local folder, or an S3 bucket/prefix with the
same keys -- see docs/s3.md)::

    ckpt/<key>/            one checkpoint: safetensors shards, config, tokenizer
    ckpt/<key>/manifest.json   written LAST: every file's size and sha256 + metadata
    results/<key>.json     one evaluation result
    alias/<name>.json      small pointers (e.g. built-in model -> its content key)

Why content addressing: the key of a checkpoint derives from the base model's
content digest and the canonical list of steps applied to it (method,
parameters and digests of the data each step read).  Identical work therefore
maps to the identical key, so a re-run finds completed steps instead of
recomputing them, and two writers of one key produce identical bytes.

Why a manifest written last: it is the commit marker.  A reader verifies it
(sizes and digests) before trusting a checkpoint, so a half-written or
corrupted checkpoint is never used; a failed write leaves only a staging
folder that no reader looks at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

log = logging.getLogger("lmcompose")
_MISSING = object()

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lm-compose-checkpoint/1"
VERIFIED_STAMP = ".verified.json"  # local cache of a successful verification (not part of the checkpoint)


class StoreError(RuntimeError):
    """Base class of store errors."""


class CheckpointNotFound(StoreError):
    """No committed checkpoint under this key."""


#: what usually makes a checkpoint a task was handed disappear (appended to CheckpointNotFound's message)
NOT_FOUND_CAUSES = (
    "likely causes: the store was emptied after Kubeflow cached the task that made it (compile components with "
    "task.set_caching_options(False): the store is the cache), or the tasks ran in different pods with a "
    "local-folder store each pod sees only on its own disk (use an s3:// store)"
)


class CorruptCheckpoint(StoreError):
    """A checkpoint whose files do not match its manifest (names the file)."""


class CorruptDocument(StoreError):
    """A stored JSON document whose content does not match its digest."""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) -- the input of every key."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_of(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def checkpoint_key(base_digest: str, steps: list[dict[str, Any]]) -> str:
    """Key of the model obtained by applying ``steps`` (keyed form) to the base model.

    A step precision other than the default float32 (``$LMCOMPOSE_STEP_DTYPE``,
    see :func:`shared.models.step_dtype`) is part of the key: the same steps
    in bfloat16 give different weights, and a store must never serve one for
    the other.  Every process of a study (steps, evaluations, aggregation)
    must therefore see the same setting; a mismatch finds nothing rather than
    the wrong model.
    """
    payload: dict[str, Any] = {"base": base_digest, "steps": steps}
    step_dtype = os.environ.get("LMCOMPOSE_STEP_DTYPE", "").strip() or "float32"
    if steps and step_dtype != "float32":
        payload["step_dtype"] = step_dtype
    return "ckpt/" + digest_of(payload)[:40]


def result_key(model_key: str, evaluator: str, config: dict[str, Any]) -> str:
    """Key of one evaluation of one model."""
    return "results/" + digest_of({"model": model_key, "evaluator": evaluator, "config": config})[:40] + ".json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(folder: Path, key: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Describe every file of a checkpoint folder (except the manifest itself)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, VERIFIED_STAMP)):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if not files:
        raise StoreError(f"refusing to write an empty checkpoint for {key}")
    return {"format": MANIFEST_FORMAT, "key": key, "created": time.time(), "files": files, "meta": meta}


_SHA256 = re.compile(r"[0-9a-f]{64}")
_RESERVED_NAMES = {MANIFEST, VERIFIED_STAMP}


class UnsafePath(CorruptCheckpoint):
    """A file name from stored data that would leave its folder (absolute, ``..``, odd characters)."""


def safe_relative_name(name: Any, what: str = "file name") -> str:
    """``name`` if it is a plain relative POSIX path that stays inside its folder; else :class:`UnsafePath`.

    Why: names in a manifest (and any other name read from stored data) come
    from whoever can write to the store.  Joined to a local folder unchecked,
    ``/home/user/.bashrc`` or ``../../x`` would make a reader write or read
    files anywhere its user can -- code execution for anyone with write access
    to a bucket.  Allowed: non-empty parts separated by ``/``, none of them
    ``.``/``..``, no backslash, NUL or other control characters, not
    starting with ``/`` or a drive letter, and not our own reserved names.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"{what} {name!r} is not a non-empty string")
    if len(name) > 1024 or any(ord(c) < 32 or c in "\\\x7f" for c in name):
        raise UnsafePath(f"{what} {name!r} has control characters, a backslash or is too long")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafePath(f"{what} {name!r} is absolute")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"{what} {name!r} has an empty, '.' or '..' part")
    if parts[-1] in _RESERVED_NAMES or (parts[-1].startswith(".") and parts[-1].endswith(".part")):
        raise UnsafePath(f"{what} {name!r} collides with a name the store itself uses")
    return name


def contained_path(folder: Path, name: str, what: str = "file name") -> Path:
    """``folder / name`` after checking ``name`` and that the result (symlinks resolved) is inside ``folder``."""
    path = Path(folder) / safe_relative_name(name, what)
    root = Path(folder).resolve()
    if not path.resolve().is_relative_to(root):
        raise UnsafePath(f"{what} {name!r} resolves outside {root} (a symbolic link?)")
    return path


def validate_manifest(manifest: Any, key: str) -> dict[str, Any]:
    """Check a manifest's own digest, its shape and every name in it before anything is read or written by it."""
    if isinstance(manifest, dict) and SEAL in manifest:
        body = {k: v for k, v in manifest.items() if k != SEAL}
        if hashlib.sha256(canonical_json(body).encode()).hexdigest() != manifest[SEAL]:
            raise CorruptCheckpoint(f"{key}: manifest does not match its own sha256 (changed after it was written)")
        manifest = body
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or manifest.get("key") != key
        or not isinstance(manifest.get("files"), dict)
        or not manifest["files"]
    ):
        raise CorruptCheckpoint(f"{key}: manifest has wrong format or key")
    for rel, info in manifest["files"].items():
        safe_relative_name(rel, f"{key}: manifest entry")
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("size"), int)
            or isinstance(info.get("size"), bool)
            or info["size"] < 0
            or not isinstance(info.get("sha256"), str)
            or not _SHA256.fullmatch(info["sha256"])
        ):
            raise CorruptCheckpoint(f"{key}: manifest entry {rel!r} needs an integer size and a sha256")
    if not isinstance(manifest.get("meta", {}), dict):
        raise CorruptCheckpoint(f"{key}: manifest meta is not an object")
    return manifest


#: the field a stored JSON document carries its own digest in (see :func:`seal_json`)
SEAL = "_sha256"


def seal_json(obj: Any) -> bytes:
    """A JSON document that carries the sha256 of its content, so a flipped byte is detected on read.

    Results, aliases and other small documents are trusted by the aggregator
    and by every later run; without a digest, a changed digit in a stored
    criterion would be reported as a result.  Non-dict documents are stored
    as they are.
    """
    if isinstance(obj, dict):
        body = {k: v for k, v in obj.items() if k != SEAL}
        obj = {**body, SEAL: hashlib.sha256(canonical_json(body).encode()).hexdigest()}
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def unseal_json(data: bytes, key: str) -> Any:
    """The document in ``data`` with its digest checked (:class:`CorruptDocument` if it does not match)."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptDocument(f"{key}: not valid JSON ({exc})") from None
    if isinstance(obj, dict) and SEAL in obj:
        body = {k: v for k, v in obj.items() if k != SEAL}
        if hashlib.sha256(canonical_json(body).encode()).hexdigest() != obj[SEAL]:
            raise CorruptDocument(f"{key}: content does not match its sha256")
        return body
    if isinstance(obj, dict) and not allow_unsealed():
        # every object document is written sealed; one without its seal was written before documents were
        # sealed -- or had its seal removed to make a change pass: not trusted, so it is computed again
        raise CorruptDocument(f"{key}: document has no {SEAL} seal (set {UNSEALED_ENV}=1 to read legacy "
                              "unsealed documents)")
    return obj  # a non-object document (never sealed), or a legacy one allowed by $LMCOMPOSE_ALLOW_UNSEALED


#: set to 1 to trust store documents written before they were sealed (see :func:`allow_unsealed`)
UNSEALED_ENV = "LMCOMPOSE_ALLOW_UNSEALED"


def allow_unsealed() -> bool:
    """Whether a stored JSON document without its ``_sha256`` seal is read (``$LMCOMPOSE_ALLOW_UNSEALED``).

    Off by default: :func:`seal_json` seals every object document this
    version writes (results, aliases, report pointers, leases), so an
    unsealed one is either from a store written before seals existed or one
    whose seal was stripped so that a changed value would pass.  Refused, it
    counts as missing: it is quarantined and computed again, like a document
    whose digest does not match.  ``LMCOMPOSE_ALLOW_UNSEALED=1`` reads such
    legacy documents as before, unverified -- for an old store you trust,
    until a re-run has rewritten them sealed.  (Checkpoint manifests are
    checked by :func:`validate_manifest`, which still accepts an unsealed one
    whose files all match it.)
    """
    value = (os.environ.get(UNSEALED_ENV) or "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise StoreError(f"{UNSEALED_ENV}={value!r}: allowed values are 1 (read legacy unsealed documents) and 0")


VERIFY_ENV = "LMCOMPOSE_VERIFY"


def verify_policy() -> str:
    """How a reader trusts a checkpoint it verified before (``$LMCOMPOSE_VERIFY``).

    * ``always`` (default): hash every file on every read.  Bit rot and copy
      tools that keep timestamps leave size and mtime unchanged, so only the
      content tells; hashing costs ~1 s per GB per core (files in parallel),
      less than loading the weights it protects.
    * ``stat``: trust a file whose (size, mtime, inode) are what they were at
      its last full verification, as git's index does -- faster, blind to
      same-size corruption that keeps the mtime.
    """
    value = os.environ.get(VERIFY_ENV, "always") or "always"
    if value not in ("always", "stat"):
        raise StoreError(f"{VERIFY_ENV}={value!r}: allowed values are 'always' and 'stat'")
    return value


def verify_folder(folder: Path, manifest: dict[str, Any], key: str) -> None:
    """Check every file listed in ``manifest`` against ``folder`` (hashed in parallel); name the first bad file."""
    from concurrent.futures import ThreadPoolExecutor

    validate_manifest(manifest, key)
    paths = {}
    for rel, info in manifest["files"].items():
        path = contained_path(folder, rel, f"{key}: manifest entry")
        if not path.is_file():
            raise CorruptCheckpoint(f"{key}: file {rel} listed in the manifest is missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise CorruptCheckpoint(f"{key}: file {rel} has {size} bytes, manifest says {info['size']}")
        paths[rel] = path
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(paths))), thread_name_prefix="lmc-verify") as pool:
        digests = {rel: pool.submit(sha256_file, path) for rel, path in paths.items()}  # hashlib releases the GIL
        for rel, info in manifest["files"].items():
            if digests[rel].result() != info["sha256"]:
                raise CorruptCheckpoint(f"{key}: file {rel} does not match its sha256 in the manifest")


class Store(ABC):
    """Interface shared by every backend (LocalStore here, S3Store in shared/store_s3.py)."""

    uri: str

    def scratch_parent(self) -> Path | None:
        """Where to write a checkpoint before committing it (None: the system temp folder)."""
        return None

    @abstractmethod
    def has_checkpoint(self, key: str) -> bool:
        """True if a committed (manifest present) checkpoint exists under ``key``."""

    @abstractmethod
    def put_checkpoint(self, key: str, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Store the files of ``folder`` under ``key``; manifest last. Returns the manifest.

        ``folder`` may be consumed (its files moved) when it lies in the store's own staging area.
        """

    @abstractmethod
    def get_checkpoint(self, key: str) -> tuple[Path, dict[str, Any]]:
        """A verified local folder holding the checkpoint, and its manifest."""

    @abstractmethod
    def checkpoint_meta(self, key: str) -> dict[str, Any]:
        """The ``meta`` of a committed checkpoint's manifest (no file verification)."""

    def quarantine(self, key: str, reason: str) -> str:
        """Take a corrupt checkpoint out of use (readers then see no checkpoint, so the step is recomputed).

        Keeps its manifest (and, locally, its files) under ``quarantine/`` for
        inspection; returns where.  Never raises for a checkpoint already gone.
        """
        raise NotImplementedError

    # -- leases (shared/lease.py): one runner per step ----------------------------------------------

    def acquire_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        """Create the lease document ``key`` for ``owner`` if there is none or it expired."""
        raise NotImplementedError

    def renew_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        """Push the expiry of ``owner``'s lease; False if the lease is no longer ``owner``'s."""
        raise NotImplementedError

    def release_lease(self, key: str, owner: str) -> None:
        """Delete the lease if ``owner`` holds it."""
        raise NotImplementedError

    def lease_holder(self, key: str) -> str | None:
        """Who holds a live lease on ``key`` (None: nobody)."""
        raise NotImplementedError

    def manifest(self, key: str) -> dict[str, Any]:
        """The committed manifest of ``key`` (shape and names checked; files not verified)."""
        return self._read_manifest(key)  # type: ignore[attr-defined]

    @abstractmethod
    def put_json(self, key: str, obj: Any) -> None:
        """Atomically store a small JSON document."""

    @abstractmethod
    def get_json(self, key: str) -> Any:
        """Read a JSON document (KeyError if absent)."""

    @abstractmethod
    def has_json(self, key: str) -> bool: ...


class LocalStore(Store):
    """A store in a local folder.

    Writes go to ``<root>/.staging/<uuid>/`` and are renamed into place, so a
    concurrent writer of the same key either finds a committed checkpoint and
    drops its own copy, or replaces an uncommitted leftover.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        # created by the first write, never by a read: a reference naming a folder that does not exist
        # fails without leaving an empty store (and its leases/) behind
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} is not a folder")
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in Path(key).parts:
            raise StoreError(f"invalid store key {key!r}")
        return self.root / key

    def scratch_parent(self) -> Path:
        """Inside the store, so committing a written checkpoint is a rename, not a copy.

        Also where leftovers of killed writers are swept (:meth:`sweep_staging`).
        """
        path = self.root / ".staging"
        path.mkdir(parents=True, exist_ok=True)
        if not getattr(self, "_swept", False):
            self._swept = True
            self.sweep_staging()
        return path

    def staging_dir(self) -> Path:
        """A fresh private folder on the same filesystem (for atomic renames)."""
        path = self.root / ".staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def _read_manifest(self, key: str) -> dict[str, Any]:
        path = self._path(key) / MANIFEST
        if not path.is_file():
            raise CheckpointNotFound(f"no committed checkpoint {key} in {self.uri}; {NOT_FOUND_CAUSES}")
        try:
            return validate_manifest(json.loads(path.read_text()), key)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpoint(f"{key}: manifest is not valid JSON ({exc})") from exc

    def has_checkpoint(self, key: str) -> bool:
        try:
            self._read_manifest(key)
            return True
        except StoreError:
            return False

    def put_checkpoint(self, key: str, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        folder = Path(folder)
        final = self._path(key)
        if self.has_checkpoint(key):  # someone else already committed identical content
            return self._read_manifest(key)
        manifest = build_manifest(folder, key, meta)
        staging = self.staging_dir()
        # a folder already inside this store's staging area (see execution._temp_dir) is on the
        # same filesystem: its files are moved, not copied, and need no second hashing
        owned = folder.resolve().is_relative_to(self.root / ".staging")
        try:
            for rel in manifest["files"]:
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if owned:
                    os.replace(folder / rel, dest)
                else:
                    shutil.copyfile(folder / rel, dest)
            if not owned:
                verify_folder(staging, manifest, key)  # what we copied is what we hashed
            tmp = staging / (MANIFEST + ".tmp")
            tmp.write_bytes(seal_json(manifest))  # the manifest's own digest: a changed parameter is caught too
            os.replace(tmp, staging / MANIFEST)  # commit marker inside staging
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists() and not self.has_checkpoint(key):
                # an uncommitted leftover of a killed writer: move it aside, then replace
                trash = self.root / ".staging" / f"trash-{uuid.uuid4().hex}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(staging, final)
            except OSError:
                if not self.has_checkpoint(key):
                    raise
                # lost the race to a writer of identical content: keep theirs
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def get_checkpoint(self, key: str) -> tuple[Path, dict[str, Any]]:
        """Verify and return a committed checkpoint; quarantine it if it does not match its manifest.

        Every file is hashed on every read by default (:func:`verify_policy`);
        with ``LMCOMPOSE_VERIFY=stat`` a file whose (size, mtime_ns, inode)
        are those of its last full verification is trusted.  A checkpoint that
        fails verification is moved to ``quarantine/`` (so the step that made
        it is recomputed by the next run) and :class:`CorruptCheckpoint` names
        the bad file and where the checkpoint went.
        """
        manifest = self._read_manifest(key)
        folder = self._path(key)
        stamp_path = folder / VERIFIED_STAMP
        stamp = {"manifest_sha256": hashlib.sha256(canonical_json(manifest).encode()).hexdigest(), "files": {}}
        for rel in manifest["files"]:
            try:
                st = contained_path(folder, rel, f"{key}: manifest entry").stat()
            except FileNotFoundError:
                break
            stamp["files"][rel] = [st.st_size, st.st_mtime_ns, st.st_ino]
        if verify_policy() == "stat":
            try:
                if json.loads(stamp_path.read_text()) == stamp:
                    return folder, manifest
            except (OSError, json.JSONDecodeError):
                pass
        try:
            verify_folder(folder, manifest, key)
        except UnsafePath:
            raise
        except CorruptCheckpoint as exc:
            where = self.quarantine(key, str(exc))
            raise CorruptCheckpoint(f"{exc}; quarantined to {where} -- re-run to recompute it") from None
        tmp = stamp_path.with_name(f".{VERIFIED_STAMP}.{uuid.uuid4().hex}")
        try:
            tmp.write_text(json.dumps(stamp))
            os.replace(tmp, stamp_path)
        except OSError:  # read-only store
            pass
        return folder, manifest

    def quarantine(self, key: str, reason: str) -> str:
        folder = self._path(key)
        dest = self.root / "quarantine" / f"{key.replace('/', '-')}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(folder, dest)  # atomic: readers see the checkpoint or nothing
        except FileNotFoundError:
            return "(already gone)"
        (dest / "QUARANTINED.txt").write_text(f"{key}\n{time.ctime()}\n{reason}\n")
        return str(dest)

    def _read_lease(self, path: Path) -> dict[str, Any] | None:
        try:
            doc = json.loads(path.read_text())
            return doc if isinstance(doc, dict) else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def acquire_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"owner": owner, "expires": time.time() + ttl_s}).encode()
        for _attempt in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                doc = self._read_lease(path)
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                live = doc.get("expires", 0) > time.time() if doc else age < ttl_s  # half-written: by its age
                if live:
                    return False
                # expired: move it aside (one stealer wins the rename), check we moved a dead one, retry
                stale = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stale")
                try:
                    os.rename(path, stale)
                except FileNotFoundError:
                    continue
                moved = self._read_lease(stale)
                if moved and moved.get("expires", 0) > time.time():  # a fresh lease taken in between: give it back
                    try:
                        os.link(stale, path)
                    except FileExistsError:
                        pass
                    stale.unlink(missing_ok=True)
                    return False
                stale.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            return True
        return False

    def lease_holder(self, key: str) -> str | None:
        doc = self._read_lease(self._path(key))  # raw: a lease being written is not a corrupt document
        return doc.get("owner") if doc and doc.get("expires", 0) > time.time() else None

    def renew_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        path = self._path(key)
        doc = self._read_lease(path)
        if not doc or doc.get("owner") != owner:
            return False
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"owner": owner, "expires": time.time() + ttl_s}))
        os.replace(tmp, path)
        return True

    def release_lease(self, key: str, owner: str) -> None:
        path = self._path(key)
        doc = self._read_lease(path)
        if doc and doc.get("owner") == owner:
            path.unlink(missing_ok=True)

    def sweep_staging(self, older_than_s: float = 24 * 3600) -> list[str]:
        """Delete staging folders a killed writer left behind (nothing in them was ever trusted).

        A folder counts as abandoned when nothing in it changed for
        ``older_than_s`` (a writer fills its folder only while saving, which
        takes minutes); ``LMCOMPOSE_STAGING_MAX_AGE`` overrides the default of a day.
        """
        older_than_s = float(os.environ.get("LMCOMPOSE_STAGING_MAX_AGE") or older_than_s)
        root = self.root / ".staging"
        removed = []
        if not root.is_dir():
            return removed
        cutoff = time.time() - older_than_s
        for entry in root.iterdir():
            try:
                newest = max([entry.stat().st_mtime] + [p.stat().st_mtime for p in entry.rglob("*")])
            except OSError:
                continue
            if newest < cutoff:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed

    def checkpoint_meta(self, key: str) -> dict[str, Any]:
        return self._read_manifest(key)["meta"]

    def delete_json(self, key: str) -> None:
        """Remove a JSON document (the writability probe); missing is fine."""
        self._path(key).unlink(missing_ok=True)

    def put_json(self, key: str, obj: Any) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(seal_json(obj))
        os.replace(tmp, path)

    def _load_json(self, key: str) -> Any:
        """The verified document, or ``_MISSING``; a corrupt one is moved to ``quarantine/`` and counts as missing."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return _MISSING
        try:
            return unseal_json(data, key)
        except CorruptDocument as exc:
            dest = self.root / "quarantine" / f"{key.replace('/', '-')}-{uuid.uuid4().hex[:6]}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(path, dest)
            except FileNotFoundError:
                pass
            log.warning("%s; quarantined to %s, so it is computed again", exc, dest)
            return _MISSING

    def get_json(self, key: str) -> Any:
        obj = self._load_json(key)
        if obj is _MISSING:
            raise KeyError(f"{key} not in {self.uri}")
        return obj

    def has_json(self, key: str) -> bool:
        """True for a present document whose digest verifies (a corrupt one is quarantined: False)."""
        return self._load_json(key) is not _MISSING


def redact_uri(uri: str) -> str:
    """``uri`` with any ``user:secret@`` part replaced by ``***@`` -- safe to print or log."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", uri)


def check_store_uri(uri: str) -> str:
    """Refuse a store URI that carries credentials or options (they would end up in compiled YAML and logs).

    Returns the URI unchanged.  Credentials come from the environment (or a
    Kubernetes Secret) only; the error never repeats them.
    """
    from urllib.parse import urlparse

    if not uri:
        raise StoreError("no store URI given")
    if "://" in uri:
        parsed = urlparse(uri)
        if "@" in parsed.netloc or parsed.query or parsed.fragment:
            raise StoreError(
                f"store URI {redact_uri(uri.split('?')[0].split('#')[0])!r} must not carry credentials or options "
                "(user:secret@, ?...): give them through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                "(a Kubernetes Secret in a cluster)"
            )
        if parsed.scheme == "s3":
            from shared.store_s3 import parse_s3_uri

            parse_s3_uri(uri)
        elif parsed.scheme != "file":
            raise StoreError(f"unsupported store URI scheme {parsed.scheme!r}; use a local path, file:// or s3://")
    return uri


def check_writable(store: Store) -> None:
    """Write and remove a small probe object, so a read-only store fails before any work, not at the end.

    Raises :class:`StoreError` naming the store and the cause.
    """
    probe = f"probes/{uuid.uuid4().hex}.json"
    try:
        store.put_json(probe, {"probe": True})
    except StoreError as exc:
        raise StoreError(f"store {store.uri} is not writable: {exc}") from None
    except OSError as exc:
        raise StoreError(f"store {store.uri} is not writable ({exc.strerror or exc})") from None
    try:
        store.delete_json(probe)
    except (StoreError, OSError) as exc:
        log.warning("could not remove the writability probe %s from %s: %s", probe, store.uri, exc)


def open_store(uri: str) -> Store:
    """Open a store from a URI: a local path, ``file://...`` or ``s3://bucket/prefix``.

    S3 endpoint, region and credentials come from the standard AWS environment
    variables (or ``AWS_PROFILE``), never from the URI or the spec.
    """
    check_store_uri(uri)
    if uri.startswith("s3://"):
        from shared.store_s3 import S3Store

        return S3Store(uri)
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return LocalStore(unquote(urlparse(uri).path))
    if "://" in uri:
        raise StoreError(f"unsupported store URI scheme in {uri!r}; use a local path, file:// or s3://")
    return LocalStore(uri)
