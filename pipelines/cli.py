"""``lmcompose`` command line: plan, run (kfp.local), compile, report.

    lmcompose plan SPEC [--store URI]
    lmcompose run SPEC [--store URI] [--out DIR]
    lmcompose compile SPEC -o FILE [--store URI]
    lmcompose report --results FILE [--out DIR]

Specs are validated before anything expensive starts; a bad spec prints one
line naming the field and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_STORE = ".lmcompose/store"


def _store_uri(args: argparse.Namespace, spec) -> str:
    uri = args.store or spec.store or os.environ.get("LMCOMPOSE_STORE") or DEFAULT_STORE
    if "://" not in uri:  # a local path: make it absolute so every task sees the same folder
        uri = str(Path(uri).expanduser().resolve())
    return uri


def cmd_plan(args: argparse.Namespace) -> int:
    from shared.planner import build_plan, format_plan
    from shared.spec import load_spec

    # listing what a store holds needs every input's digest, so S3 data is fetched then only
    spec = load_spec(args.spec, fetch_remote=bool(args.store))
    plan = build_plan(spec)
    done = None
    if args.store:
        from shared.execution import completed_nodes

        done = completed_nodes(_store_uri(args, spec), spec, plan)
    print(format_plan(plan, done))
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.builder import compile_pipeline
    from shared.spec import load_spec

    # s3:// data inputs are read by the pipeline's steps, which may see buckets this machine cannot
    spec = load_spec(args.spec, fetch_remote=False)
    compile_pipeline(spec, _store_uri(args, spec), args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.local import run_local
    from shared.interventions import available
    from shared.report import console_table, load_results
    from shared.spec import load_spec

    spec = load_spec(args.spec)
    store_uri = _store_uri(args, spec)
    out = Path(args.out or f"outputs/{spec.name}").resolve()
    started = time.time()
    report_dir = run_local(spec, store_uri, out)
    results = load_results(report_dir / "results.csv")
    categories = {name: m.category.value for name, m in available().items()}
    print()
    print("Composability per pair and setting (first>second: the first-named method applied first;")
    print("OFE: order-free error, OS: order sensitivity; lower is better for both):")
    print(console_table(results, categories))
    print()
    print(f"finished in {time.time() - started:.0f} s")
    print(f"report:  {report_dir / 'report.md'}")
    print(f"results: {report_dir / 'results.csv'}")
    print(f"output folder: {report_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from shared.report import build_report, console_table, load_results

    results = load_results(Path(args.results))
    out = Path(args.out or Path(args.results).resolve().parent / "report")
    build_report(results, out, title=args.title or "lm-compose report")
    print(console_table(results))
    print(f"\nreport written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from shared.export import export_compressed
    from shared.store import open_store

    store_uri = args.store or os.environ.get("LMCOMPOSE_STORE") or DEFAULT_STORE
    folder, _ = open_store(store_uri).get_checkpoint(args.model_key)
    try:
        facts = export_compressed(folder, Path(args.out))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    print(f"exported {args.model_key} to {args.out} ({facts['format']})")
    print(f"weights on disk: {mb(facts['bytes'])} (dense checkpoint: {mb(facts['dense_bytes'])}, "
          f"ratio {facts['bytes'] / facts['dense_bytes']:.2f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcompose", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of each step")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the plan of a spec and its counts")
    p.add_argument("spec")
    p.add_argument("--store", help="store URI; marks steps already done there")
    p.add_argument("--json", action="store_true", help="also print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a spec end to end with kfp.local on this machine")
    p.add_argument("spec")
    p.add_argument("--store", help=f"store URI (default: spec's store, $LMCOMPOSE_STORE, or {DEFAULT_STORE})")
    p.add_argument("--out", help="output folder (default: outputs/<spec name>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="compile a spec to a Kubeflow pipeline YAML")
    p.add_argument("spec")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--store", help="store URI the pipeline will use")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("export", help="write a compressed checkpoint in its packed format (compressed-tensors)")
    p.add_argument("model_key", help="checkpoint key, e.g. from the model_key column of results.csv")
    p.add_argument("--out", required=True, help="output folder (loadable with transformers' from_pretrained)")
    p.add_argument("--store", help=f"store URI (default: $LMCOMPOSE_STORE or {DEFAULT_STORE})")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="build the composability report from a results table")
    p.add_argument("--results", required=True, help="results table (.csv or .parquet)")
    p.add_argument("--out", help="output folder (default: report/ beside the table)")
    p.add_argument("--title")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shared.data import DataError
    from shared.spec import SpecError
    from shared.store import StoreError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (SpecError, DataError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
