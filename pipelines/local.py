"""Run a compiled experiment on this machine with kfp.local (no Docker, no Kubernetes)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from pipelines.builder import build_pipeline, evaluation_options
from pipelines.live_view import LiveView
from shared.planner import build_plan
from shared.spec import ExperimentSpec

log = logging.getLogger("lmcompose")


def run_local(spec: ExperimentSpec, store_uri: str, out_dir: Path, live: bool = False) -> Path:
    """Execute ``spec`` through kfp.local's SubprocessRunner; return the folder holding the report.

    Tasks run as subprocesses of this Python environment (``use_venv=False``),
    so the installed library is what they import.  KFP's local cache is off:
    the store already skips completed steps, and its keys, unlike KFP's cache
    keys, cover what the steps computed from.

    ``live=True`` (``lmcompose run``) shows a concise live view instead of
    kfp.local's output and keeps every task's log under ``out_dir/logs/``;
    a failed task then raises :class:`pipelines.live_view.RunFailed` naming
    the task, its own error and its log.
    """
    import kfp.local

    from shared.execution import base_digest_in_store, latest_report_key, report_key
    from shared.store import open_store

    # kfp.local runs one task at a time: every evaluation may use all cores
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = build_plan(spec)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(out_dir / "kfp-local"),
        enable_caching=False,
    )
    check_model_reachable(spec.model, store_uri)
    from shared.store import check_writable

    check_writable(open_store(store_uri))  # a read-only store fails now, not at the report after every task
    pipeline = build_pipeline(spec, store_uri, plan, kubernetes=False)
    if live:
        _run_with_live_view(pipeline, out_dir / "logs")
    else:
        pipeline()

    # the aggregator committed the report to the store; fetch it into the output folder
    digest = base_digest_in_store(store_uri, spec.model)
    key = report_key(
        digest,
        json.dumps(plan.to_json(), sort_keys=True),
        spec.data.for_batch(0).model_dump_json(),  # what the aggregator was given
        json.dumps(evaluation_options(spec), sort_keys=True),
    )
    folder, _ = open_store(store_uri).get_checkpoint(latest_report_key(store_uri, key))
    report_dir = out_dir / "report"
    if report_dir.exists():
        shutil.rmtree(report_dir)
    shutil.copytree(folder, report_dir, ignore=shutil.ignore_patterns("manifest.json"))
    return report_dir


def check_model_reachable(source: str, store_uri: str, timeout_s: float = 10.0) -> None:
    """Fail before any task when a hub model cannot be had: not in the store, not cached, hub unreachable.

    The default path runs without network; a ``hf:`` model is for cluster
    configurations.  A model already in the store (or in the local hub cache)
    needs no network.
    """
    from shared.data import DataError
    from shared.execution import base_digest_in_store
    from shared.models import parse_source

    parsed = parse_source(source)
    if parsed.kind != "hub":
        return
    try:
        base_digest_in_store(store_uri, source)
        return
    except KeyError:
        pass
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    try:
        snapshot_download(parsed.name, revision=parsed.revision, local_files_only=True,
                          allow_patterns=["config.json"])
        return
    except Exception:  # noqa: BLE001 - not cached: ask the hub
        pass
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise DataError(f"model: {source} is neither in the store nor in the local hub cache, and HF_HUB_OFFLINE is set")
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as exc:
        raise DataError(
            f"model: {source} is neither in the store nor in the local hub cache, and the hub ({host}) cannot be "
            f"reached ({exc.__class__.__name__}); local runs need no network with builtin: models or a local model "
            "folder -- hf: models are for clusters (or download the model once and point 'model:' at the folder)"
        ) from None


def _run_with_live_view(pipeline, log_dir: Path) -> None:
    """Run ``pipeline`` with kfp.local's output going to log files and a live view on the terminal."""
    import sys

    tasks = pipeline.pipeline_spec.root.dag.tasks
    view = LiveView({name: task.task_info.name for name, task in tasks.items()}, log_dir, out=sys.stdout).start()
    saved = sys.stdout, sys.stderr
    root = logging.getLogger()
    handlers = [(h, h.stream) for h in root.handlers if isinstance(h, logging.StreamHandler)]
    sys.stdout = sys.stderr = view
    for handler, _stream in handlers:
        handler.setStream(view)
    try:
        pipeline()
    except BaseException:
        view.interrupted()
        raise_failure = True
    else:
        raise_failure = view.failed is not None
    finally:
        sys.stdout, sys.stderr = saved
        for handler, stream in handlers:
            handler.setStream(stream)
        view.close()
    if raise_failure:
        raise view.failure()
