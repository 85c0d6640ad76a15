"""The check images/build-local.sh runs *inside* a built image (mounted read-only, never baked in).

Run as the image's user and again as an arbitrary UID in group 0 (OpenShift
style).  It checks, and fails with a message on the first thing that is wrong:

1. the image's smoke test: the pinned torch (a CPU build in the CPU image),
   kfp, the library, the built-in data and the built-in model's GGUF;
2. who runs it: not root, group 0, a writable HOME and caches, ``lmcompose --help``;
3. no network (it runs in an empty network namespace);
4. one intervention component and one evaluation component end to end, with the
   component interface a Kubeflow user touches -- ``prepare_base`` ->
   ``wanda`` -> ``evaluate`` chained by their ``model`` artifacts, run by
   ``kfp.local.SubprocessRunner(use_venv=False)`` in the image's own Python, on
   ``builtin:tiny-random``, with the Hub switched off (``HF_HUB_OFFLINE=1``).

Prints one JSON line with what ran (the build script keeps it in its log).
Usage: python3 check_image.py --kind cpu|cuda [--expect-uid N]
"""

# (no `from __future__ import annotations`: KFP reads the pipeline function's annotations as types)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple


def fail(message: str) -> None:
    print(f"check_image: FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def smoke(kind: str) -> dict:
    import kfp
    import torch

    import components.aggregate  # noqa: F401
    import pipelines.cli  # noqa: F401
    from shared.data import BUILTIN_DIR
    from shared.models import gguf_path

    if torch.__version__.split("+")[0] != "2.13.0":
        fail(f"torch {torch.__version__}, constraints.txt pins 2.13.0")
    if kind == "cpu" and torch.version.cuda is not None:
        fail(f"the CPU image holds a CUDA build of torch ({torch.__version__}, CUDA {torch.version.cuda})")
    if kind == "cuda" and torch.version.cuda is None:
        fail(f"the CUDA image holds a CPU build of torch ({torch.__version__})")
    if not sorted(BUILTIN_DIR.glob("*.jsonl")):
        fail(f"no built-in data under {BUILTIN_DIR}")
    gguf = gguf_path()
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "kfp": kfp.__version__,
            "gguf_mb": round(Path(gguf).stat().st_size / 2**20, 1)}


def user(expect_uid: int | None) -> dict:
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        fail("runs as root")
    if expect_uid is not None and uid != expect_uid:
        fail(f"runs as uid {uid}, expected {expect_uid}")
    if gid != 0:
        fail(f"primary group {gid}, expected 0 (group-writable HOME for arbitrary UIDs)")
    home = Path(os.environ["HOME"])
    for folder in (home, Path(os.environ["LMCOMPOSE_CACHE"]), Path(os.environ["HF_HOME"]), Path("/scratch")):
        probe = folder / f".write-probe-{uid}"
        try:
            probe.write_text("x")
            probe.unlink()
        except OSError as exc:
            fail(f"uid {uid} cannot write to {folder}: {exc}")
    result = subprocess.run(["lmcompose", "--help"], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or "usage" not in result.stdout.lower():
        fail(f"lmcompose --help: rc {result.returncode}\n{result.stderr[-2000:]}")
    return {"uid": uid, "gid": gid, "home": str(home)}


class Outputs(NamedTuple):
    results: str


def offline() -> dict:
    """The check runs without a network (build-local.sh runs it in an empty network namespace)."""
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        return {"network": f"none ({type(exc).__name__})"}
    fail("pypi.org is reachable: the check is meant to run offline (--allow-network to skip this)")
    return {}


def components_end_to_end() -> dict:
    import kfp.local
    from kfp import dsl

    from components.evaluate import evaluate
    from components.prepare_base import prepare_base
    from components.wanda import wanda

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("LMCOMPOSE_EVAL_THREADS", "2")

    @dsl.pipeline(name="image-check")
    def image_check(store_uri: str) -> Outputs:
        base = prepare_base(model_source="builtin:tiny-random", store_uri=store_uri)
        pruned = wanda(model=base.outputs["model"], sparsity=0.5, num_calibration_samples=4, calibration_seq_len=32)
        scores = evaluate(model=pruned.outputs["model"], evaluators=["perplexity", "compression"],
                          batch_size=4, max_length=32, dtype="float32")
        return Outputs(scores.outputs["results"])

    work = Path(tempfile.mkdtemp(prefix="image-check-", dir="/scratch"))
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "kfp-local"),
                   enable_caching=False)
    started = time.time()
    run = image_check(store_uri=str(work / "store"))
    seconds = time.time() - started
    out = json.loads(run.outputs["results"])
    criteria = {k: v for by_eval in out["criteria"].values() for k, v in by_eval.items()}
    if not 0.45 <= criteria.get("sparsity", -1) <= 0.55:
        fail(f"wanda(sparsity=0.5) gave measured sparsity {criteria.get('sparsity')}")
    if not criteria.get("perplexity", 0) > 1.0:
        fail(f"perplexity {criteria.get('perplexity')}")
    steps = json.loads(next((work / "kfp-local").rglob("wanda/model")).read_text())
    if steps.get("key") != out["model_key"]:
        fail("the evaluated model is not the one wanda wrote")
    return {"pipeline": "prepare_base(builtin:tiny-random) -> wanda(0.5) -> evaluate(perplexity, compression)",
            "seconds": round(seconds, 1), "criteria": criteria}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--expect-uid", type=int)
    parser.add_argument("--skip-components", action="store_true", help="only the smoke test and the user checks")
    parser.add_argument("--allow-network", action="store_true", help="do not insist on running offline")
    args = parser.parse_args(argv)
    os.chdir("/")  # the installed library, not a source tree
    report = {"kind": args.kind, "offline": {} if args.allow_network else offline(),
              "smoke": smoke(args.kind), "user": user(args.expect_uid)}
    if not args.skip_components:
        report["components"] = components_end_to_end()
    print("check_image: OK " + json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
