"""The model reference: what a KFP ``Model`` artifact of lm-compose holds.

Why a reference and not the checkpoint itself: the content-addressed store is
the system of record (dedup across runs and shards, resume, verification,
tensor caches).  KFP's v2 launcher would upload a checkpoint written to an
output artifact's path into the pipeline root -- a second copy of 16 GB per
step -- and download it again before every consumer starts, unverified and
outside our cache.  So the artifact's file is this small JSON document naming
the store and the checkpoint key, and the artifact's *metadata* describes the
checkpoint (key, base model, every step with its full parameters, compression
state, size on disk) so the Kubeflow UI shows what a user needs.  KFP records
the artifact under the pipeline root as usual, which gives lineage from the
base model to each composed model; the weights are written once (into the
store) and read at most once per task (from the store, verified).  See
docs/components.md.

No KFP import here: components turn these dicts into artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REF_FORMAT = "lm-compose-model-ref/1"


class ModelRefError(ValueError):
    """A Model artifact that is not an lm-compose model reference (names what is wrong)."""


@dataclass(frozen=True)
class ModelRef:
    """A committed checkpoint: the store it lives in and its content key."""

    store_uri: str
    key: str

    def to_json(self) -> dict[str, Any]:
        return {"format": REF_FORMAT, "store": self.store_uri, "key": self.key}

    @classmethod
    def from_json(cls, raw: Any, where: str = "model reference") -> "ModelRef":
        if not isinstance(raw, dict) or raw.get("format") != REF_FORMAT:
            raise ModelRefError(
                f"{where} is not an lm-compose model reference (expected JSON with format {REF_FORMAT!r}); "
                "pass the 'model' output of prepare_base or of an intervention component"
            )
        store, key = raw.get("store"), raw.get("key")
        if not isinstance(store, str) or not store or not isinstance(key, str) or not key.startswith("ckpt/"):
            raise ModelRefError(f"{where}: 'store' and a 'ckpt/...' 'key' are required, got {raw!r}")
        from shared.store import safe_relative_name

        safe_relative_name(key, f"{where}: key")
        return cls(store, key)

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> "ModelRef":
        path = Path(path)
        if path.is_dir():  # an artifact folder (some launchers): the reference is its model.json
            path = path / "model.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelRefError(f"model artifact file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelRefError(f"model artifact {path} is not JSON ({exc})") from None
        return cls.from_json(raw, f"model artifact {path}")


def compression_summary(compression: dict[str, Any] | None) -> dict[str, Any]:
    """The compression state as flat fields for the UI (method, bits, group size, sparsity, avg bits, on grid)."""
    if not compression:
        return {"compressed": False}
    out: dict[str, Any] = {"compressed": True, "compression_method": compression.get("method", "")}
    for name in ("kind", "bits", "group_size", "sparsity", "measured_sparsity", "symmetric", "mask_structure"):
        if compression.get(name) is not None:
            out[f"compression_{name}"] = compression[name]
    out["compression_on_grid"] = not compression.get("modified_after", False)
    avg_bits = expected_avg_bits(compression)
    if avg_bits is not None:
        out["compression_avg_bits"] = round(avg_bits, 4)
    previous = compression.get("previous")
    if previous:
        out["compression_previous_method"] = previous.get("method", "")
    return out


def expected_avg_bits(compression: dict[str, Any]) -> float | None:
    """Average bits per weight implied by a compression record (the formula of ``measure_compression``)."""
    from shared.evaluation.compression import DENSE_BITS, GROUP_OVERHEAD_BITS, PRUNED_BITS, _quantization

    quant = _quantization(compression)
    if quant is not None and quant.get("bits") and quant.get("group_size"):
        return float(quant["bits"]) + GROUP_OVERHEAD_BITS / int(quant["group_size"])
    if quant is None and compression.get("measured_sparsity") is not None:
        s = float(compression["measured_sparsity"])
        return PRUNED_BITS * s + DENSE_BITS * (1 - s)
    return None


def artifact_metadata(ref: ModelRef, manifest: dict[str, Any]) -> dict[str, Any]:
    """Metadata of a Model artifact: everything that identifies the checkpoint, from its manifest."""
    meta = manifest.get("meta", {})
    steps = meta.get("steps", [])
    size = sum(int(info.get("size", 0)) for info in manifest.get("files", {}).values())
    out: dict[str, Any] = {
        "lmcompose_format": REF_FORMAT,
        "store": ref.store_uri,
        "key": ref.key,
        "base_source": meta.get("source", ""),
        "base_digest": meta.get("base_digest") or meta.get("model_digest", ""),
        "num_steps": len(steps),
        "steps": [{"method": s["method"], "version": s.get("version", ""), "params": s.get("params", {})} for s in steps],
        "composition": " > ".join(s["method"] for s in steps) or "base",
        "size_bytes": size,
        "num_files": len(manifest.get("files", {})),
    }
    out.update(compression_summary(meta.get("compression")))
    return out
