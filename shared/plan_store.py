"""A study's plan in the store, so that the aggregation run carries a reference instead of the plan.

The aggregator needs the whole plan (every composition and node of the
study).  Carried as a pipeline constant, it made the aggregation run's Argo
workflow grow with the study -- 263 KB of plan for the paper's editing x
compression study, stored twice and escaped twice in the workflow, 680 KB in
all -- so a study twice that size would not fit Argo's 1 MiB
(docs/cost-model.md).  Instead ``lmcompose compile``/``submit`` (and
``lmcompose run``) write the plan to the store under a key made of its
content, ``plans/<sha256>.json``, and the aggregator receives only

    {"plan_key": "plans/<sha256>.json", "plan_sha256": "<sha256>"}

(:func:`plan_reference`).  It reads the document and checks its digest
(:func:`resolve_plan`): a missing or changed plan fails the aggregation with
a message naming the key and the command that uploads it.

The stored document is the plan itself, sealed like every store document
(``_sha256``); :func:`sealed_plan_bytes` gives its exact bytes, which
``compile`` also writes beside the pipeline files so that a machine that
cannot reach the store can upload it later (``lmcompose upload-plan``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.store import canonical_json, digest_of, seal_json, unseal_json

PLAN_PREFIX = "plans/"


def plan_digest(plan_json: str | dict[str, Any]) -> str:
    """The sha256 of a plan's canonical JSON."""
    return digest_of(json.loads(plan_json) if isinstance(plan_json, str) else plan_json)


def plan_key(plan_json: str | dict[str, Any]) -> str:
    """The store key of a plan: ``plans/<sha256>.json``."""
    return f"{PLAN_PREFIX}{plan_digest(plan_json)}.json"


def plan_reference(plan_json: str | dict[str, Any]) -> str:
    """What the aggregator receives in place of the plan: its key and digest, as JSON."""
    return json.dumps({"plan_key": plan_key(plan_json), "plan_sha256": plan_digest(plan_json)}, sort_keys=True)


def is_reference(plan_arg: str) -> bool:
    try:
        obj = json.loads(plan_arg)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and set(obj) == {"plan_key", "plan_sha256"}


def sealed_plan_bytes(plan_json: str | dict[str, Any]) -> bytes:
    """The exact bytes the store holds for a plan (what :func:`put_plan` writes)."""
    return seal_json(json.loads(plan_json) if isinstance(plan_json, str) else plan_json)


def put_plan(store_uri: str, plan_json: str | dict[str, Any]) -> str:
    """Write the plan to the store (idempotent: same content, same key); return its key."""
    from shared.store import open_store

    obj = json.loads(plan_json) if isinstance(plan_json, str) else plan_json
    key = plan_key(obj)
    store = open_store(store_uri)
    if not store.has_json(key):
        store.put_json(key, obj)
    return key


def read_plan_file(path: str | Path) -> dict[str, Any]:
    """A plan file written by ``lmcompose compile`` (sealed), its seal checked."""
    return unseal_json(Path(path).read_bytes(), str(path))


class PlanNotFound(RuntimeError):
    """The plan a reference names is not in the store, or its content is not what the reference says."""


def resolve_plan(store_uri: str, plan_arg: str) -> str:
    """The plan JSON: ``plan_arg`` itself, or the stored plan it references (digest checked)."""
    if not is_reference(plan_arg):
        return plan_arg
    from shared.store import open_store

    ref = json.loads(plan_arg)
    key, digest = ref["plan_key"], ref["plan_sha256"]
    try:
        obj = open_store(store_uri).get_json(key)
    except KeyError:
        raise PlanNotFound(
            f"the study's plan {key} is not in the store {store_uri}: compile wrote it beside the pipeline files "
            f"as <study>.plan.json; upload it with `lmcompose upload-plan <that file> --store {store_uri}` "
            "(lmcompose submit does this itself), then run the aggregation again") from None
    if digest_of(obj) != digest:
        raise PlanNotFound(f"the plan stored at {key} in {store_uri} has sha256 {digest_of(obj)}, not {digest}")
    return canonical_json(obj)
