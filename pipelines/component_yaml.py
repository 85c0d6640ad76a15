"""Compile every KFP component to a standalone component YAML under ``components/yaml/``.

Other pipelines reuse lm-compose's components without importing this project::

    from kfp import components
    wanda = components.load_component_from_file("components/yaml/wanda.yaml")

One file per component -- every intervention, ``evaluate`` and every single
evaluator, ``prepare_base``, ``export``, ``collect_results`` and ``aggregate`` -- named after the component's Python function
(``wanda.yaml``, ``evaluate_perplexity.yaml``, ``prepare_base.yaml``).

The image a component names is read from the environment when
``components.image`` is imported (``LMCOMPOSE_IMAGE_REPOSITORY``,
``LMCOMPOSE_IMAGE_TAG``, ``LMCOMPOSE_BASE_IMAGE``).  The committed files
always name the default image, so compilation runs in a fresh interpreter
with those variables removed: the output does not depend on the caller's
environment or on what it has imported.  KFP writes nothing time- or
host-dependent into a component YAML (its ``sdkVersion`` is the pinned kfp
version), so regenerating unchanged components gives byte-identical files.

Usage::

    python -m pipelines.component_yaml            # (re)write components/yaml/*.yaml
    python -m pipelines.component_yaml --check    # exit 1 listing stale, missing or extra files
    python -m pipelines.component_yaml --out DIR  # write elsewhere
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: where the committed component YAMLs live
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "components" / "yaml"
#: environment variables components/image.py reads; unset while compiling
IMAGE_ENV = ("LMCOMPOSE_IMAGE_REPOSITORY", "LMCOMPOSE_IMAGE_TAG", "LMCOMPOSE_BASE_IMAGE")
REGENERATE = "python -m pipelines.component_yaml"


def all_components() -> dict[str, Any]:
    """Every component, by file stem (its Python function's name): interventions, evaluators, prepare_base, aggregate."""
    from components import evaluator_components, intervention_components
    from components.aggregate import aggregate
    from components.collect_results import collect_results
    from components.evaluate import evaluate
    from components.export import export
    from components.prepare_base import prepare_base

    out: dict[str, Any] = {}
    for comp in [*intervention_components().values(), *evaluator_components().values(), evaluate, prepare_base,
                 export, collect_results, aggregate]:
        name = comp.python_func.__name__
        if name in out and out[name] is not comp:
            raise ValueError(f"two components are both named {name!r}")
        out[name] = comp
    return dict(sorted(out.items()))


def _header(comp: Any) -> str:
    module = comp.python_func.__module__.replace(".", "/") + ".py"
    return f"# Generated from {module} by `{REGENERATE}` (make components). Do not edit.\n"


def compile_into(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Compile every component into ``out_dir`` in this interpreter, with whatever image it has imported.

    Use :func:`generate` for the committed files: it runs this in a clean environment.
    """
    from kfp import compiler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, comp in all_components().items():
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(comp, str(path))
        path.write_text(_header(comp) + path.read_text())
        paths.append(path)
    return paths


def _compile_clean(out_dir: Path) -> None:
    """:func:`compile_into` in a fresh interpreter without the image variables (default image, fresh imports)."""
    env = {k: v for k, v in os.environ.items() if k not in IMAGE_ENV}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    code = "import sys; from pipelines.component_yaml import compile_into; compile_into(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(out_dir)], env=env, cwd=root, check=True)


def generate(out_dir: str | os.PathLike[str] = DEFAULT_OUT) -> list[Path]:
    """Write every component's YAML into ``out_dir`` (default image); remove generated YAMLs of removed components."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _compile_clean(Path(tmp))
        fresh = {p.name: p.read_bytes() for p in Path(tmp).glob("*.yaml")}
    for stale in out.glob("*.yaml"):  # a component that no longer exists; never a file this module did not write
        if stale.name not in fresh and stale.read_text().startswith("# Generated from components/"):
            stale.unlink()
    paths = []
    for name, content in sorted(fresh.items()):
        path = out / name
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
        paths.append(path)
    return paths


def check(out_dir: str | os.PathLike[str] = DEFAULT_OUT) -> list[str]:
    """Problems with the YAMLs in ``out_dir`` (empty when they are exactly what :func:`generate` writes)."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        _compile_clean(Path(tmp))
        fresh = {p.name: p.read_bytes() for p in Path(tmp).glob("*.yaml")}
    present = {p.name: p.read_bytes() for p in out.glob("*.yaml")} if out.is_dir() else {}
    return file_differences(out, fresh, present, "no such component")


def file_differences(out: Path, fresh: dict[str, bytes], present: dict[str, bytes], extra_reason: str) -> list[str]:
    """Missing, stale and extra files of a generated folder: ``fresh`` is what generation writes, ``present`` what is there."""
    problems = [f"missing: {out / n}" for n in sorted(fresh) if n not in present]
    problems += [f"stale: {out / n}" for n in sorted(fresh) if n in present and present[n] != fresh[n]]
    problems += [f"extra ({extra_reason}): {out / n}" for n in sorted(present) if n not in fresh]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are not up to date")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print(f"component YAMLs are out of date: run `{REGENERATE}` (make components)", file=sys.stderr)
            return 1
        print(f"{len(all_components())} component YAMLs in {args.out} are up to date")
        return 0
    paths = generate(args.out)
    print(f"wrote {len(paths)} component YAMLs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
