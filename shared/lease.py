"""One runner per step: a lease per store key, so concurrent runs of one spec do not compute the same step twice.

Why: two runs of one study on one store (a re-submitted pipeline, two shards
that share a prefix, a user running the demo twice) used to compute every
step both, since each only looked for a committed result first.  Content
addressing made that harmless but wasteful (hours of GPU time per 8B step).

A lease is a small JSON document ``leases/<key>.json`` -- ``{"owner", "expires"}``
-- created only if absent (``O_EXCL`` in a local folder, ``If-None-Match: *``
on S3) and renewed by a heartbeat thread while its holder computes.  Another
runner that finds a live lease waits and polls for the committed result; if
the holder dies, its lease expires after ``ttl_s`` and the next runner takes
over -- at once when the holder was a process of the same host that is gone
(a killed local run).  A lease is an optimisation, never a correctness condition: results
are still committed atomically, so on a server that ignores conditional
writes, or after a missed heartbeat, the worst case is the old one (both
compute, the first commit wins).

Settings: ``LMCOMPOSE_LEASE_TTL`` (seconds, default 300) and
``LMCOMPOSE_LEASE_POLL`` (default 5).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("lmcompose")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def lease_key(key: str) -> str:
    """Store key of the lease on ``key`` (``ckpt/ab12..`` -> ``leases/ckpt-ab12...json``)."""
    return "leases/" + key.replace("/", "-").removesuffix(".json") + ".json"


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_dead(owner: str | None) -> bool:
    """True when ``owner`` ran on this host and its process is gone (a killed local run): no need to wait out its lease.

    Holders on other hosts (other pods) cannot be checked; their leases expire after the TTL.
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextmanager
def _heartbeat(store: Any, key: str, owner: str, ttl_s: float) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                if not store.renew_lease(lease_key(key), owner, ttl_s):
                    log.warning("lost the lease on %s (expired and taken over); finishing anyway", key)
                    return
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not kill the computation
                log.warning("could not renew the lease on %s: %s", key, exc)

    thread = threading.Thread(target=beat, name="lmcompose-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def compute_once(
    store: Any,
    key: str,
    done: Callable[[], bool],
    compute: Callable[[], Any],
    ttl_s: float | None = None,
    poll_s: float | None = None,
) -> bool:
    """Run ``compute`` unless ``done()`` or another runner holding the lease on ``key`` produces the result.

    Returns True if this call computed, False if the result was (or became)
    there.  ``done`` is checked again after the lease is taken, so a result
    committed in between is not recomputed.
    """
    ttl_s = ttl_s or _env_float("LMCOMPOSE_LEASE_TTL", 300.0)
    poll_s = poll_s or _env_float("LMCOMPOSE_LEASE_POLL", 5.0)
    owner = new_owner()
    announced = False
    while True:
        if done():
            return False
        if store.acquire_lease(lease_key(key), owner, ttl_s):
            try:
                if done():
                    return False
                with _heartbeat(store, key, owner, ttl_s):
                    compute()
                return True
            finally:
                try:
                    store.release_lease(lease_key(key), owner)
                except Exception as exc:  # noqa: BLE001 - an unreleased lease only expires
                    log.warning("could not release the lease on %s: %s", key, exc)
        holder = store.lease_holder(lease_key(key))
        if holder_is_dead(holder):
            log.warning("the lease on %s belongs to %s, a process of this host that is gone; taking it over", key, holder)
            store.release_lease(lease_key(key), holder)
            continue
        if not announced:
            holder = holder or "another runner"
            log.warning("%s is being computed by %s; waiting for its result (or for its lease to expire)", key, holder)
            announced = True
        time.sleep(poll_s)
