#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a device machine without network
# (docs/gpu.md): the wheels of the packages the library imports on the measured
# code paths that such a machine lacks (it has torch, transformers, peft,
# accelerate, safetensors, pandas and their dependencies), for CPython 3.12 on
# x86-64 Linux, at the versions constraints.txt pins, and SmolLM2's tokenizer
# (the built-in GGUF, 98 MB, does not travel).  Everything goes under .gpu-carry/
# (git-ignored), which the device call names in `carry`.  Never torch or
# transformers: the device's own builds are used.
#
#   benchmarks/gpu_wheels.sh [--python-version 3.12]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYV=3.12
[ "${1:-}" = --python-version ] && PYV=$2
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${GPU_CARRY:-$ROOT/.gpu-carry}  # GPU_CARRY: another folder (e.g. wheels for another Python)
# imported on the paths gpu_check.py runs (found with python -X importtime) and not on the device:
#   llm-compressor and compressed-tensors (wanda, sparsegpt, gptq, awq), loguru (llm-compressor's log),
#   lm_eval (multiple-choice evaluation) with datasets (+ pyarrow, dill, multiprocess, xxhash) and
#   sacrebleu (+ lxml, portalocker, tabulate, colorama), which lm_eval imports at start-up,
#   pydantic (every method's parameters), requests (llm-compressor, lm_eval; huggingface_hub 1.x,
#   and so transformers, no longer brings it); each is installed only where it does not import already.
#   Checked by running the dry run in a venv holding only torch, transformers, peft, accelerate,
#   safetensors and pandas, with these wheels (for that venv's Python) installed as on the device.
PACKAGES="llmcompressor compressed-tensors loguru lm_eval datasets pyarrow dill multiprocess xxhash
          sacrebleu lxml portalocker tabulate colorama pydantic pydantic_core annotated-types typing-inspection
          requests urllib3 idna certifi charset_normalizer"
pins=()
for p in $PACKAGES; do
  norm=$(echo "$p" | tr '_.' '--' | tr 'A-Z' 'a-z')
  pin=$(awk -F'==' -v want="$norm" '{n=tolower($1); gsub(/[_.]/,"-",n); if (n==want) print $1"=="$2}' "$ROOT/constraints.txt")
  [ -n "$pin" ] || { echo "gpu_wheels.sh: $p is not pinned in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf "$OUT/wheels" "$OUT/wheels-pyarrow" && mkdir -p "$OUT/wheels" "$OUT/wheels-pyarrow"
# --no-deps: exactly this list (the device's own numpy/pandas/torch/transformers stay); binary wheels only
PIP_CONSTRAINT= "$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$PYV" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform any \
  -d "$OUT/wheels" "${pins[@]}"
# pyarrow alone is ~53 MB: it travels in a call of its own (docs/gpu.md, "two calls")
mv "$OUT"/wheels/pyarrow-*.whl "$OUT/wheels-pyarrow/"
# SmolLM2's tokenizer, from the built-in GGUF
rm -rf "$OUT/tokenizer"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "
from shared.models import _load_builtin_tokenizer
_load_builtin_tokenizer().save_pretrained('$OUT/tokenizer')"
du -sh "$OUT/wheels-pyarrow" "$OUT/wheels" "$OUT/tokenizer"
repo=$(git -C "$ROOT" ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
first=$(( repo + $(du -sb "$OUT/wheels-pyarrow" | cut -f1) ))
second=$(( repo + $(du -sb "$OUT/wheels" | cut -f1) + $(du -sb "$OUT/tokenizer" | cut -f1) ))
echo "call 1 carries $((first / 1024 / 1024)) MiB, call 2 $((second / 1024 / 1024)) MiB (repository files included; limit 64 MiB each)"
for n in $first $second; do
  [ $n -lt $((62 * 1024 * 1024)) ] || { echo "gpu_wheels.sh: a call would carry more than 62 MiB" >&2; exit 1; }
done
