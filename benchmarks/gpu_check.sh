#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): every intervention, every evaluator and one
# two-step composition through the library entry points the components call, in
# bfloat16 on CUDA, on random-weight Llama models at SmolLM2's shape and at
# Llama-3-8B's layer shapes; time and peak GPU memory per step, per layer at the
# 8B shape extrapolated to 32 layers; a cost table `lmcompose plan --estimate
# --cost FILE` reads.  Results go to $OUT (the device tool's output folder), else
# ./gpu-check-out.
#
#   benchmarks/gpu_check.sh                 on a CUDA machine (under 10 min on one H200)
#   benchmarks/gpu_check.sh --cpu           the dry run here: same code, tiny shapes, CPU
#   benchmarks/gpu_check.sh --install-only  install the carried wheels and stop (first of two device calls)
#   ... any other argument goes to benchmarks/gpu_check.py (--budget-s, --layers-8b, --skip-8b)
#
# On a machine without network the packages the device lacks come as wheels in
# .gpu-carry/ (made by benchmarks/gpu_wheels.sh); they are installed without
# dependencies and without an index into .gpu-site/site-packages (git-ignored), which goes
# first on PYTHONPATH.  torch and transformers are never installed: the machine's own are used.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-check-out}
# the folder's path must contain "site-packages": dill (which datasets hashes calibration sets
# with) pickles modules from anywhere else by value, and pyarrow's types cannot be pickled
SITE=${GPU_SITE:-$ROOT/.gpu-site/site-packages}
CARRY=${GPU_CARRY:-.gpu-carry}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
install_only=0 cpu=0 args=()
for a in "$@"; do
  case "$a" in
    --install-only) install_only=1 ;;
    --cpu) cpu=1; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 1. carried wheels -> .gpu-site (only those whose package is not importable already)
shopt -s nullglob
wheels=("$CARRY"/wheels*/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  # a wheel whose module (its distribution name, for every carried one) imports already is left out:
  # the machine's own version, or one installed by an earlier call, stays
  mapfile -t todo < <("$PY" - "${wheels[@]}" <<'PY'
import importlib.util, os, sys
for wheel in sys.argv[1:]:
    module = os.path.basename(wheel).split("-")[0]
    if importlib.util.find_spec(module) is None:
        print(wheel)
PY
)
  if [ ${#todo[@]} -gt 0 ]; then
    echo "gpu_check.sh: installing ${#todo[@]} carried wheels into $SITE"
    "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" --upgrade "${todo[@]}" 2>&1 | grep -v "WARNING: Target directory" || true
  fi
fi
if [ $install_only = 1 ]; then
  echo "gpu_check.sh: --install-only: $(ls "$SITE" 2>/dev/null | grep -c dist-info || true) packages in $SITE"
  exit 0
fi

# 2. what this machine has (recorded with the results)
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo "${LMCOMPOSE_COMMIT:-?}")"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'PY' || true
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "pandas", "numpy", "pyarrow", "datasets",
             "lm_eval", "llmcompressor", "compressed_tensors", "pydantic"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", type(exc).__name__, str(exc)[:200])
PY
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
if grep -q MISSING "$OUT/environment.txt"; then
  echo "gpu_check.sh: packages are missing (above); carry .gpu-carry/ (benchmarks/gpu_wheels.sh, docs/gpu.md)" >&2
  exit 3
fi

# 3. the measurements
tokenizer=()
[ -f "$CARRY/tokenizer/tokenizer.json" ] && tokenizer=(--tokenizer "$CARRY/tokenizer")
work=${GPU_CHECK_WORK:-}
[ -z "$work" ] && { [ $cpu = 1 ] && work=$OUT/work || work=${TMPDIR:-/tmp}/gpu-check-work; }
exec "$PY" benchmarks/gpu_check.py --out "$OUT" --work "$work" "${tokenizer[@]}" "${args[@]}"
