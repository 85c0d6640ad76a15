"""Content identity of a model folder: a local directory or an S3 prefix.

Why content and not the path: a base model found in the store under the
identity of its *path* stays found after the folder's weights are replaced in
place, so every later step would silently act on the old weights.  The
identity here is a digest over every file's relative name, size and content
hash, so a changed folder is a new base model and an unchanged one (at any
path, on any machine) is the same.

Cheap on repeats: a local file's sha256 is remembered in a small index under
``$LMCOMPOSE_CACHE/folder-digests`` keyed by the folder's path and trusted
only while the file's size, mtime, ctime and inode are unchanged (ctime cannot
be set back by a user, so an in-place rewrite always invalidates it).  An S3
object's identity is its ETag (computed by the server from the content) and
size: nothing is downloaded to identify a prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: index format; bump if what the index records changes
_INDEX_VERSION = 1


def _cache_root() -> Path:
    return Path(os.environ.get("LMCOMPOSE_CACHE") or Path.home() / ".cache" / "lm-compose").expanduser()


def folder_files(folder: Path) -> list[Path]:
    """The regular files of a model folder, recursively, in name order (hidden files and folders skipped).

    Hidden entries (``.git``, ``.cache`` of huggingface_hub downloads, editor
    swap files) are not part of a model.
    """
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            out.append(path)
    return out


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _index_path(folder: Path) -> Path:
    name = hashlib.sha256(str(folder).encode()).hexdigest()[:32]
    return _cache_root() / "folder-digests" / f"{name}.json"


def _read_index(path: Path, folder: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != _INDEX_VERSION or raw.get("folder") != str(folder):
        return {}
    files = raw.get("files")
    return files if isinstance(files, dict) else {}


def _write_index(path: Path, folder: Path, files: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _INDEX_VERSION, "folder": str(folder), "files": files}, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: no fast path, still correct
        log.debug("could not write the folder digest index %s: %s", path, exc)


def local_file_digests(folder: Path | str) -> dict[str, tuple[int, str]]:
    """``{relative name: (size, sha256)}`` of every file of ``folder``, hashing only files changed since last time."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    index_path = _index_path(folder)
    known = _read_index(index_path, folder)
    files: dict[str, Any] = {}
    out: dict[str, tuple[int, str]] = {}
    for path in folder_files(folder):
        rel = path.relative_to(folder).as_posix()
        stat_key = _stat_key(path)
        entry = known.get(rel)
        if isinstance(entry, dict) and entry.get("stat") == stat_key and isinstance(entry.get("sha256"), str):
            digest = entry["sha256"]
        else:
            digest = _sha256(path)
            if _stat_key(path) != stat_key:  # written while hashing: do not remember a digest of a moving file
                stat_key = []
        files[rel] = {"stat": stat_key, "sha256": digest}
        out[rel] = (stat_key[0] if stat_key else path.stat().st_size, digest)
    if files != known:
        _write_index(index_path, folder, files)
    return out


def _identity(entries: list[tuple[str, int, str]]) -> str:
    h = hashlib.sha256()
    for rel, size, digest in sorted(entries):
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
    return h.hexdigest()


def local_folder_identity(folder: Path | str) -> str:
    """Digest of a local folder's content: every file's relative name, size and sha256."""
    digests = local_file_digests(folder)
    if not digests:
        raise FileNotFoundError(f"model folder {folder} is empty")
    return _identity([(rel, size, sha) for rel, (size, sha) in digests.items()])


def _s3_store(uri: str) -> Any:
    from shared.store_s3 import S3Store

    return S3Store(uri)


def s3_prefix_listing(uri: str) -> list[tuple[str, int, str]]:
    """``[(relative name, size, ETag)]`` of every object under the prefix ``uri`` (hidden names skipped)."""
    return _s3_store(uri).list_prefix()


def s3_prefix_identity(uri: str) -> str:
    """Digest of an S3 prefix's content: every object's relative name, size and ETag (the server's content hash)."""
    listing = s3_prefix_listing(uri)
    if not listing:
        raise FileNotFoundError(f"no objects under {uri}")
    return _identity(listing)


def download_s3_folder(uri: str, dest: Path | str) -> list[str]:
    """Download every object under the prefix ``uri`` into ``dest`` (each atomically, pinned by ETag)."""
    store = _s3_store(uri)
    dest = Path(dest)
    names = []
    for rel, _size, _etag in store.list_prefix():
        store.download_object(rel, dest / rel)
        names.append(rel)
    if not names:
        raise FileNotFoundError(f"no objects under {uri}")
    return names
