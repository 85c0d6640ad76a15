"""``lmcompose`` command line: plan, run (kfp.local), compile, report.

    lmcompose plan SPEC [--store URI] [--shards N|auto] [--estimate [--gpus 8,64] [--cost FILE]]
    lmcompose run SPEC [--store URI] [--out DIR]
    lmcompose compile SPEC -o FILE|DIR [--store URI] [--placement FILE] [--shards N|auto]
    lmcompose submit SPEC --host URL [--experiment NAME] [--store URI] [--placement FILE] [--shards N|auto]
    lmcompose upload-plan PLAN_FILE --store URI
    lmcompose compare LABEL=REPORT_DIR LABEL=REPORT_DIR ... --out DIR
    lmcompose findings [RESULTS_DIR] [--out FILE]
    lmcompose report --results FILE [--out DIR] [--items FILE] [--resamples N] [--seed S] [--confidence C]

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

from shared.spec import SpecError

DEFAULT_STORE = ".lmcompose/store"
DEFAULT_RESAMPLES_CLI = 1000  # shared.uncertainty.DEFAULT_RESAMPLES, without importing numpy at start-up


def _store_uri(args: argparse.Namespace, spec) -> str:
    from shared.store import check_store_uri

    uri = check_store_uri(args.store or spec.store or os.environ.get("LMCOMPOSE_STORE") or DEFAULT_STORE)
    if "://" not in uri:  # a local path: make it absolute so every task sees the same folder
        uri = str(Path(uri).expanduser().resolve())
    return uri


def _cluster(args: argparse.Namespace, spec):
    """The spec's cluster settings over the placement file's, with ``--shards`` on top."""
    from shared.cluster import load_placement, merge_cluster

    placement = load_placement(args.placement) if getattr(args, "placement", None) else None
    cluster = spec.cluster_config(placement)
    if getattr(args, "shards", None):
        cluster = merge_cluster(cluster.model_dump(mode="json", exclude_none=True), {"shards": args.shards})
    return cluster


def _cluster_store_uri(args: argparse.Namespace, spec) -> str:
    """The store of a cluster run: --store, the spec's, the placement file's lmcompose-store ConfigMap, $LMCOMPOSE_STORE."""
    from shared.cluster import load_store_uri
    from shared.store import StoreError

    uri = args.store or spec.store
    if not uri and getattr(args, "placement", None):
        uri = load_store_uri(args.placement)
    uri = uri or os.environ.get("LMCOMPOSE_STORE")
    if uri:
        from shared.store import check_store_uri, redact_uri

        check_store_uri(uri)
    if not uri or not uri.startswith("s3://"):
        raise StoreError(
            f"a cluster run needs an s3:// store (got {redact_uri(uri) if uri else 'none'}): pass --store s3://bucket/prefix, set the "
            "spec's 'store', or render manifests/ with the lmcompose-store ConfigMap and pass it as --placement"
        )
    return uri


def _model_header(spec, one) -> str:
    """The line introducing one model's part of a multi-model study's output."""
    return f"== model {one.model}: run {one.name} =="


def cmd_plan(args: argparse.Namespace) -> int:
    from shared.spec import load_spec

    # listing what a store holds needs every input's digest, so S3 data is fetched then only
    spec = load_spec(args.spec, fetch_remote=bool(args.store))
    for i, one in enumerate(spec.per_model()):
        if spec.models:
            print(("\n" if i else "") + _model_header(spec, one))
        _plan_one(args, one)
    return 0


def _plan_one(args: argparse.Namespace, spec) -> None:
    from shared.planner import build_plan, format_plan, pipeline_counts

    plan = build_plan(spec)
    done = None
    if args.store:
        from shared.execution import completed_nodes

        done = completed_nodes(_store_uri(args, spec), spec, plan)
    print(format_plan(plan, done))
    cluster = _cluster(args, spec)
    shards, largest, aggregation = _size_runs(args, spec, plan, cluster)
    runs = pipeline_counts(plan, shards)
    print(
        f"pipeline runs:      {runs['pipeline_runs']}"
        + (f" ({shards} shards + 1 aggregation run)" if shards > 1 else " (one run)")
        + (" -- cluster.shards: auto" if cluster.shards == "auto" else "")
    )
    print(f"KFP tasks:          {runs['tasks']} (largest run: {runs['largest_run_tasks']})")
    print(f"workflow size:      largest run {_size_line(largest)}")
    if aggregation is not None:
        print(f"                    aggregation run {_size_line(aggregation)}")
    from pipelines.workflow_size import CALIBRATED_FOR

    print(f"                    (budget {cluster.workflow_budget_bytes / 1024:,.0f} KiB at the end of a run: "
          f"cluster.workflow_budget_bytes; modelled for {CALIBRATED_FOR}: docs/cost-model.md)")
    if args.estimate:
        from shared.estimate import LLAMA3_8B_A100, estimate, format_estimate, load_cost_table

        try:
            gpus = tuple(int(n) for n in args.gpus.split(","))
        except ValueError:
            raise SpecError(f"--gpus: expected comma-separated GPU counts such as 8,64, got {args.gpus!r}") from None
        if any(n < 1 for n in gpus):
            raise SpecError(f"--gpus: GPU counts must be at least 1, got {args.gpus!r}")
        try:
            cost = load_cost_table(args.cost) if args.cost else LLAMA3_8B_A100
        except ValueError as exc:
            raise SpecError(f"--cost: {exc}") from None
        print(format_estimate(estimate(plan, gpus, cost=cost, shards=shards)))
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))


def _size_runs(args: argparse.Namespace, spec, plan, cluster):
    """(shards, size of the largest run, size of the aggregation run or None) -- compiles those runs."""
    from pipelines.builder import size_runs

    # the store named in the workflow changes its size by a few bytes; any s3:// URI will do for sizing
    store_uri = args.store or spec.store or os.environ.get("LMCOMPOSE_STORE") or "s3://lm-compose/store"
    try:
        return size_runs(spec, store_uri, cluster, plan)
    except ValueError as exc:
        raise SpecError(f"cluster.{exc}") from None


def _size_line(size) -> str:
    return (f"{size.name}: {size.tasks} tasks, {size.created_bytes / 1024:,.0f} KiB on creation, "
            f"{size.end_bytes / 1024:,.0f} KiB expected at the end")


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.builder import compile_study
    from shared.spec import load_spec
    from shared.store import StoreError

    # s3:// data inputs are read by the pipeline's steps, which may see buckets this machine cannot
    spec = load_spec(args.spec, fetch_remote=False)
    out = Path(args.output)
    if spec.models and out.suffix in (".yaml", ".yml", ".json"):
        raise SpecError(
            f"models: the study runs once per model ({', '.join(spec.model_labels())}); "
            f"-o must name a folder for their files, not {args.output}"
        )
    for one in spec.per_model():
        cluster = _cluster(args, one)
        if not args.store and not one.store and args.placement:
            from shared.cluster import load_store_uri

            args.store = load_store_uri(args.placement)
        store_uri = _store_uri(args, one)
        if not store_uri.startswith("s3://"):
            if not args.local_store:
                raise StoreError(
                    f"store {store_uri} is a local folder, which tasks in other pods cannot see: pass --store "
                    "s3://bucket/prefix for a cluster (or --local-store for a folder every pod mounts, e.g. a shared volume)"
                )
            print(f"warning: store {store_uri} is a local folder: every task's pod must mount it at this path "
                  "(--local-store)", file=sys.stderr)
        to_file = not spec.models and out.suffix in (".yaml", ".yml", ".json") and not out.is_dir()
        try:
            files = compile_study(one, store_uri, str(out), cluster,
                                  progress=lambda line: print(line, file=sys.stderr, flush=True),
                                  output_file=str(out) if to_file else None)
        except ValueError as exc:
            raise SpecError(f"cluster.{exc}") from None
        for path, size in zip(files, files.sizes):
            print(f"wrote {path}  ({size.tasks} tasks; workflow {size.created_bytes / 1024:,.0f} KiB on creation, "
                  f"{size.end_bytes / 1024:,.0f} KiB expected at the end)")
        print(f"wrote {files.plan_file}  (the plan the report reads from the store as {files.plan_key}; "
              f"lmcompose submit uploads it, or: lmcompose upload-plan {files.plan_file} --store {store_uri})")
    return 0


def _kfp_client(args: argparse.Namespace):
    """A ``kfp.Client`` for ``--host``; credentials only from the environment or the pod.

    ``LMCOMPOSE_KFP_TOKEN`` (a bearer token) or ``LMCOMPOSE_KFP_COOKIES``
    (e.g. the ``authservice_session`` cookie of a Dex-protected Kubeflow) are
    passed on.  Without them, inside a pod with KFP's projected
    service-account token (``$KF_PIPELINES_SA_TOKEN_PATH``, default
    ``/var/run/secrets/kubeflow/pipelines/token``), that token is used and
    re-read as the kubelet refreshes it -- kfp.Client does not do this by
    itself when ``host`` is given, and a ``--wait`` outlives one token.
    """
    import kfp
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    token = os.environ.get("LMCOMPOSE_KFP_TOKEN") or None
    cookies = os.environ.get("LMCOMPOSE_KFP_COOKIES") or None
    credentials = None
    token_file = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
    if token is None and cookies is None and os.path.isfile(token_file):
        credentials = ServiceAccountTokenVolumeCredentials(token_file)
    return kfp.Client(
        host=args.host, namespace=args.namespace, existing_token=token, cookies=cookies, credentials=credentials
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from shared.spec import load_spec

    spec = load_spec(args.spec, fetch_remote=False)
    experiment = args.experiment or f"lmcompose-{spec.name}"
    for one in spec.per_model():  # a multi-model study: one study per model, in the same KFP experiment
        if spec.models:
            print(_model_header(spec, one))
        rc = _submit_one(args, one, experiment)
        if rc:
            return rc
    return 0


def _submit_one(args: argparse.Namespace, spec, experiment: str) -> int:
    import tempfile

    from pipelines.builder import compile_study

    cluster = _cluster(args, spec)
    store_uri = _cluster_store_uri(args, spec)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = compile_study(spec, store_uri, tmp, cluster)
        except ValueError as exc:
            raise SpecError(f"cluster.{exc}") from None
        shards = paths.shards
        for path, size in zip(paths, paths.sizes):
            print(f"{Path(path).name.removesuffix('.pipeline.yaml')}: {size.tasks} tasks, workflow "
                  f"{size.created_bytes / 1024:,.0f} KiB on creation, {size.end_bytes / 1024:,.0f} KiB expected at "
                  "the end")
        _upload_plan(store_uri, paths.plan_file, args)
        if args.aggregate_only:
            if shards == 1:
                raise SpecError("--aggregate-only: the study is not sharded (one run); its run reports itself")
            paths = paths[-1:]
        shard_paths, aggregation = (paths, None) if shards == 1 or args.aggregate_only else (paths[:-1], paths[-1])
        client = _kfp_client(args)
        submitted = []
        for path in shard_paths:
            name = Path(path).name.removesuffix(".pipeline.yaml")
            run = client.create_run_from_pipeline_package(
                path, arguments={}, run_name=name, experiment_name=experiment, namespace=args.namespace,
                service_account=args.service_account, enable_caching=False,
            )
            submitted.append(run.run_id)
            print(f"submitted {name}: run {run.run_id}  {args.host.rstrip('/')}/#/runs/details/{run.run_id}")
        if aggregation is None:
            return 0
        if not args.wait:
            print(f"\n{len(submitted)} shard runs submitted. When all have succeeded, submit the report run:\n"
                  f"  lmcompose submit {args.spec} --host {args.host} --aggregate-only"
                  + (f" --experiment {args.experiment}" if args.experiment else "")
                  + (f" --store {args.store}" if args.store else ""))
            return 0
        failed = []
        for run_id in submitted:
            result = client.wait_for_run_completion(run_id, timeout=args.timeout)
            if str(result.state).upper() != "SUCCEEDED":
                failed.append(f"{run_id} ({result.state})")
        if failed:
            print(f"error: shard run(s) did not succeed: {', '.join(failed)}; fix and re-submit them "
                  "(finished steps are found in the store), then --aggregate-only", file=sys.stderr)
            return 1
        run = client.create_run_from_pipeline_package(
            aggregation, arguments={}, run_name=Path(aggregation).name.removesuffix(".pipeline.yaml"),
            experiment_name=experiment,
            namespace=args.namespace, service_account=args.service_account, enable_caching=False,
        )
        print(f"submitted the aggregation run: {run.run_id}")
    return 0


def _upload_plan(store_uri: str, plan_file: str, args: argparse.Namespace) -> None:
    """Put the study's plan into the store before any run is submitted (the report reads it there)."""
    from shared.plan_store import put_plan, read_plan_file
    from shared.store import StoreError

    try:
        key = put_plan(store_uri, read_plan_file(plan_file))
    except (StoreError, OSError) as exc:
        raise StoreError(
            f"the study's plan could not be written to the store {store_uri} ({exc}); its report reads the plan "
            "there: give this machine the store's credentials (AWS_* variables), or compile with `lmcompose compile` "
            "and upload the .plan.json it writes from a machine that has them (`lmcompose upload-plan FILE --store "
            f"{store_uri}`), then submit again") from None
    print(f"plan: {key} in {store_uri}")


def cmd_upload_plan(args: argparse.Namespace) -> int:
    from shared.plan_store import put_plan, read_plan_file
    from shared.store import CorruptDocument, check_store_uri

    store_uri = check_store_uri(args.store or os.environ.get("LMCOMPOSE_STORE") or "")
    try:
        plan = read_plan_file(args.plan_file)
    except FileNotFoundError:
        raise SpecError(f"upload-plan: {args.plan_file} does not exist") from None
    except CorruptDocument as exc:
        raise SpecError(f"upload-plan: {exc} (a plan file is written by lmcompose compile and must not be edited)") \
            from None
    if not isinstance(plan, dict) or "nodes" not in plan or "compositions" not in plan:
        raise SpecError(f"upload-plan: {args.plan_file} is not a plan file written by lmcompose compile")
    key = put_plan(store_uri, plan)
    print(f"uploaded the plan of {plan.get('spec_name', '?')} to {store_uri} as {key}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from shared.spec import load_spec

    spec = load_spec(args.spec)
    out = Path(args.out or f"outputs/{spec.name}").resolve()
    if not spec.models:
        _run_one(args, spec, out)
        return 0
    started = time.time()
    folders = {}
    for label, one in zip(spec.model_labels(), spec.per_model()):
        print(_model_header(spec, one))
        folders[label] = _run_one(args, one, out / label)
        print()
    written = _compare(folders, out / "cross-model", f"Composability across models: {spec.name}")
    print(f"all {len(folders)} models finished in {time.time() - started:.0f} s")
    print(f"cross-model report: {written['report']}")
    return 0


def _run_one(args: argparse.Namespace, spec, out: Path) -> Path:
    """Run one single-model study with kfp.local, print its table; return its report folder."""
    from pipelines.live_view import RunFailed
    from pipelines.local import run_local
    from shared.interventions import available
    from shared.report import console_table, load_results

    store_uri = _store_uri(args, spec)
    started = time.time()
    try:
        report_dir = run_local(spec, store_uri, out, live=True)
    except RunFailed as exc:
        if "quarantined to" not in str(exc):
            raise
        # a checkpoint failed verification and was taken out of use: one more run recomputes it
        print(f"\n{exc}\n\nre-running once: the store recomputes the quarantined step, everything else is reused\n")
        report_dir = run_local(spec, store_uri, out, live=True)
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
    print(f"task logs: {out / 'logs'}")
    print(f"output folder: {report_dir}")
    return report_dir


def _compare(folders: dict[str, Path], out: Path, title: str) -> dict[str, Path]:
    from shared.cross_model import build_cross_model_report, read_model_report

    reports = [read_model_report(label, folder) for label, folder in folders.items()]
    return build_cross_model_report(reports, out, title=title)


def cmd_compare(args: argparse.Namespace) -> int:
    folders: dict[str, Path] = {}
    for item in args.reports:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SpecError(f"compare: expected LABEL=REPORT_FOLDER, got {item!r}")
        if label in folders:
            raise SpecError(f"compare: label {label!r} given twice")
        folders[label] = Path(folder)
    if len(folders) < 2:
        raise SpecError("compare: name at least two report folders (LABEL=REPORT_FOLDER ...)")
    from shared.inputs import output_folder, writing

    output_folder(args.out)  # before reading anything: an --out that is a file is refused at once
    with writing("compare"):  # a malformed report folder is an InputError naming the file, row and column
        written = _compare(folders, Path(args.out), args.title or "Composability across models")
    print(f"cross-model report written to {written['report']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from shared.report import build_report, console_table, load_results

    from shared.interventions import available

    from shared.uncertainty import read_item_records

    from shared.inputs import InputError, output_folder, writing
    from shared.uncertainty import check_results_match_items

    out = output_folder(args.out or Path(args.results).resolve().parent / "report")
    results = load_results(Path(args.results))
    # the method categories order each pair (editor before compressor, as the aggregator does) and group "# Wins"
    categories = {name: m.category.value for name, m in available().items()}
    # per-item scores for the intervals: --items, else the items.json the aggregator writes beside results.csv
    items_path = Path(args.items) if args.items else Path(args.results).resolve().parent / "items.json"
    if args.items and not items_path.is_file():
        raise InputError(f"items file {items_path} does not exist")
    items = read_item_records(items_path) if items_path.is_file() else None
    if items:  # each criterion must be what its per-item scores give (a changed value is refused)
        check_results_match_items(results, items, args.results, str(items_path))
    with writing("report"):
        build_report(results, out, title=args.title or "lm-compose report", categories=categories, items=items,
                     resamples=args.resamples, seed=args.seed, confidence=args.confidence)
    print(console_table(results, categories))
    print(f"\nreport written to {out}")
    return 0


def cmd_findings(args: argparse.Namespace) -> int:
    from shared.findings import write_findings

    command = "lmcompose findings " + " ".join(
        [args.results_dir, "--out", args.out]
        + ([f"--resamples {args.resamples}"] if args.resamples != DEFAULT_RESAMPLES_CLI else [])
        + ([f"--seed {args.seed}"] if args.seed else []))
    from shared.inputs import writing

    with writing("findings"):
        results = write_findings(args.results_dir, args.out, args.resamples, args.seed, args.confidence, command)
    for r in results:
        print(f"{r.finding.number}. {r.finding.title}: {r.verdict}" + (f" ({r.note})" if r.note else ""))
    print(f"\nwritten to {args.out}")
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


SHARDS_HELP = ("split the study into N pipeline runs, or 'auto': the fewest whose workflows fit "
               "cluster.workflow_budget_bytes (overrides cluster.shards)")


def _shards(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of runs or 'auto', got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _confidence(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    from shared.uncertainty import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED

    parser = argparse.ArgumentParser(prog="lmcompose", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of each step")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the plan of a spec and its counts")
    p.add_argument("spec")
    p.add_argument("--store", help="store URI; marks steps already done there")
    p.add_argument("--json", action="store_true", help="also print the plan as JSON")
    p.add_argument("--estimate", action="store_true",
                   help="estimate GPU-hours and makespan on a cluster (Llama-3-8B on A100 cost table, docs/cost-model.md)")
    p.add_argument("--gpus", default="8,64", help="GPU counts for --estimate (default 8,64)")
    p.add_argument("--cost", metavar="FILE",
                   help="cost table for --estimate: a JSON file such as benchmarks/gpu_check.sh's cost_table.json "
                        "(docs/gpu.md); default: the Llama-3-8B/A100 estimates")
    p.add_argument("--placement", help="cluster placement file (see manifests/): counts runs with its shards")
    p.add_argument("--shards", type=_shards, help=SHARDS_HELP)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a spec end to end with kfp.local on this machine")
    p.add_argument("spec")
    p.add_argument("--store", help=f"store URI (default: spec's store, $LMCOMPOSE_STORE, or {DEFAULT_STORE})")
    p.add_argument("--out", help="output folder (default: outputs/<spec name>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="compile a spec to Kubeflow pipeline YAML (one file, or a folder of shard runs)")
    p.add_argument("spec")
    p.add_argument("-o", "--output", required=True, help="output file; a folder when the study is sharded")
    p.add_argument("--store", help="store URI the pipeline will use (s3://bucket/prefix in a cluster)")
    p.add_argument("--placement", help="cluster placement file: a cluster block, or rendered manifests/ "
                   "holding the lmcompose-placement ConfigMap")
    p.add_argument("--shards", type=_shards, help=SHARDS_HELP)
    p.add_argument("--local-store", action="store_true",
                   help="allow a local-folder store (every pod must mount it at the same path; default: refused)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="compile a spec and submit it to Kubeflow Pipelines")
    p.add_argument("spec")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080 (port-forwarded ml-pipeline-ui)")
    p.add_argument("--experiment", help="KFP experiment name (default: lmcompose-<spec name>)")
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--service-account", help="service account the run's pods use (default: KFP's)")
    p.add_argument("--store", help="s3:// store URI (default: spec's, the placement file's, $LMCOMPOSE_STORE)")
    p.add_argument("--placement", help="cluster placement file (see --help of compile)")
    p.add_argument("--shards", type=_shards, help=SHARDS_HELP)
    p.add_argument("--wait", action="store_true", help="wait for the shard runs, then submit the aggregation run")
    p.add_argument("--timeout", type=int, default=7 * 24 * 3600, help="seconds to wait per run with --wait")
    p.add_argument("--aggregate-only", action="store_true", help="submit only the aggregation run of a sharded study")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("upload-plan", help="put a study's plan file (written by compile) into the store")
    p.add_argument("plan_file", help="the <study>.plan.json lmcompose compile wrote beside the pipeline files")
    p.add_argument("--store", help="the s3:// store the compiled pipelines use (default: $LMCOMPOSE_STORE)")
    p.set_defaults(func=cmd_upload_plan)

    p = sub.add_parser("export", help="write a compressed checkpoint in its packed format (compressed-tensors)")
    p.add_argument("model_key", help="checkpoint key, e.g. from the model_key column of results.csv")
    p.add_argument("--out", required=True, help="output folder (loadable with transformers' from_pretrained)")
    p.add_argument("--store", help=f"store URI (default: $LMCOMPOSE_STORE or {DEFAULT_STORE})")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="build the composability report from a results table")
    p.add_argument("--results", required=True, help="results table (.csv or .parquet)")
    p.add_argument("--out", help="output folder (default: report/ beside the table)")
    p.add_argument("--title")
    p.add_argument("--items", help="per-item scores for the intervals (default: items.json beside the table, if any)")
    p.add_argument("--resamples", type=_positive_int, default=DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"bootstrap seed (default {DEFAULT_SEED})")
    p.add_argument("--confidence", type=_confidence, default=DEFAULT_CONFIDENCE,
                   help=f"interval level in (0, 1) (default {DEFAULT_CONFIDENCE})")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare composability across models: one study report folder per model")
    p.add_argument("reports", nargs="+", metavar="LABEL=REPORT_FOLDER",
                   help="a model's label and its study report folder (lmcompose run's output folder)")
    p.add_argument("--out", required=True, help="output folder of the cross-model report")
    p.add_argument("--title")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("findings", help="check the paper's seven findings on study reports (docs/findings.md)")
    p.add_argument("results_dir", nargs="?", default="docs/results",
                   help="folder of study report folders (default docs/results)")
    p.add_argument("--out", default="docs/findings.md", help="Markdown file to write (default docs/findings.md)")
    p.add_argument("--resamples", type=_positive_int, default=DEFAULT_RESAMPLES)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--confidence", type=_confidence, default=DEFAULT_CONFIDENCE)
    p.set_defaults(func=cmd_findings)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.live_view import RunFailed
    from shared.cluster import PlacementError
    from shared.data import DataError
    from shared.inputs import InputError
    from shared.store import StoreError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (SpecError, DataError, StoreError, PlacementError, InputError) as exc:
        # InputError: a malformed report file or an unusable --out (compare, findings, report), one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:  # the failing task's own error and its log: the last thing the user sees
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
