"""State a method keeps along a model's lineage, beside the checkpoint's weights.

Some methods need more than the weights they are handed: sequential AlphaEdit
protects the keys of every earlier AlphaEdit edit on the same model (the
reference's ``K_p K_pᵀ`` cache) and takes its null-space projector from the
model before the first of them.  A composition step starts from a checkpoint,
not from a running editor, so that state travels with the checkpoint: each
checkpoint folder may hold ``lineage_state/<method>.safetensors`` (tensors,
plus the method's JSON metadata in the safetensors header -- never pickle).

* A step whose method has ``uses_lineage_state`` gets its parent's entry for
  that method (:class:`Lineage`) and returns its new entry as
  ``record["lineage_state"]``; the executor writes it into the new checkpoint.
* Every other step copies its parent's entries unchanged, so
  ``alphaedit > wanda > alphaedit`` still protects the first step's keys.

The folder is part of the checkpoint (covered by its manifest, so verified on
read like the weights), and the checkpoint's key is content-addressed by the
steps that made it, so the state is too: the same steps from the same base
give the same state.  It sits in a sub-folder so that nothing that globs a
checkpoint's ``*.safetensors`` (sizes, exports) mistakes it for weights.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: sub-folder of a checkpoint that holds the entries, one file per method
LINEAGE_DIR = "lineage_state"
_FORMAT = "lm-compose-lineage-state-v1"


@dataclass
class LineageEntry:
    """One method's state: tensors (written) and JSON metadata (written); ``memory`` is never written.

    ``memory`` lets a caller that keeps the model in memory (benchmarks, tests)
    chain two applications without a store: AlphaEdit keeps the root's
    statistics there.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    memory: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Lineage:
    """What a lineage-aware step is given besides the model.

    * ``entry`` -- the state its method left earlier on this lineage (None: the first such step);
    * ``parent_key`` -- the store key of the checkpoint handed in ('' outside a store);
    * ``model_digest`` -- that checkpoint's content digest ('' if not known);
    * ``statistics_of`` -- ``(digest, checkpoint key, windows, layers) -> (covs, info)``: key
      statistics of another checkpoint of the lineage (its root), through the store's
      content-keyed cache, loading that checkpoint only on a miss (None outside a store).
    """

    entry: LineageEntry | None = None
    parent_key: str = ""
    model_digest: str = ""
    statistics_of: Callable[[str, str, list[list[int]], list[int]], tuple[dict[int, torch.Tensor], dict[str, Any]]] | None = None


def _path(folder: Path | str, method: str) -> Path:
    if not method.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method name {method!r} cannot name a lineage state file")
    return Path(folder) / LINEAGE_DIR / f"{method}.safetensors"


def load_entry(folder: Path | str, method: str) -> LineageEntry | None:
    """``method``'s entry in a checkpoint folder, or None."""
    from safetensors import safe_open

    path = _path(folder, method)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a lineage state file (format {header.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return LineageEntry(tensors, json.loads(header.get("meta", "{}")))


def save_entry(folder: Path | str, method: str, entry: LineageEntry) -> None:
    """Write ``method``'s entry into a checkpoint folder (replacing the one there)."""
    from safetensors.torch import save_file

    path = _path(folder, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in entry.tensors.items()}
    header = {"format": _FORMAT, "method": method, "meta": json.dumps(entry.meta, sort_keys=True)}
    save_file(tensors, str(path), metadata=header)


def carry(parent_folder: Path | str, dest: Path | str, method: str = "", entry: LineageEntry | None = None) -> None:
    """Copy the parent's entries into a new checkpoint folder; ``method``'s replaced by ``entry`` when given."""
    src = Path(parent_folder) / LINEAGE_DIR
    if src.is_dir():
        for path in sorted(src.glob("*.safetensors")):
            if entry is not None and path.stem == method:
                continue
            (Path(dest) / LINEAGE_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, Path(dest) / LINEAGE_DIR / path.name)
    if entry is not None:
        save_entry(dest, method, entry)
