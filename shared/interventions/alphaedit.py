"""AlphaEdit -- null-space constrained knowledge editing (Fang et al., ICLR 2025).

AlphaEdit is MEMIT with one change in the closed form.  MEMIT trades the new
facts against what a layer already stores through ``λ C`` in
``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` -- a soft penalty, so every update also moves the
outputs for ordinary keys a little.  AlphaEdit instead projects the update
onto the *null space* of the preserved keys ``K₀`` (the layer's keys on
generic text): with ``C = E[k kᵀ] = U Λ Uᵀ`` and ``Û`` the eigenvectors whose
eigenvalue is below ``nullspace_threshold``, ``P = Û Ûᵀ`` and

    ΔWᵀ = (P K Kᵀ + α I)⁻¹ P K Rᵀ        (α = ``l2``),

whose columns lie in the range of ``P``, so ``ΔW k₀ ≈ 0`` for every preserved
key: the edit cannot disturb the outputs the statistics cover (up to the
energy below the threshold).  Everything else -- the target values ``z``
(stage 1), the spreading of the residual over the layer range, the key
statistics and their content-keyed cache -- is MEMIT's
(:mod:`shared.interventions.memit`), with AlphaEdit's own target settings
(below).

Sequential editing, as the reference: the keys of every earlier AlphaEdit
edit on the same model (``K_p``, measured on the model after that edit, as
the reference's ``cache_c`` update) join the normal equations,

    ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ,

so a later batch does not move an earlier batch's outputs within the null
space either; and ``P`` comes from the statistics of the lineage's *root* --
the model before its first AlphaEdit step -- not from each step's input
model.  Both travel with the checkpoint (:mod:`shared.lineage_state`:
``lineage_state/alphaedit.safetensors``, the keys per layer and the root's
content digest), so ``alphaedit > ... > alphaedit`` in a composition, with
any steps between, uses them; the root's statistics are read from the
store's content-keyed cache under the root's digest (the root checkpoint is
loaded and measured only if that entry is gone).  The record says how many
earlier keys were protected (``previous_keys`` per layer,
``protected_previous_keys``) and whose statistics ``P`` came from
(``projector_source``).  ``protect_previous_edits: false`` leaves ``K_p``
out (for comparison; the keys are still recorded).  The separate edit
batches of ``data.num_batches`` are independent replicates, each from the
base model, so their states never mix.

Target stage: the reference's AlphaEdit settings (Llama-3-8B), not MEMIT's
tuned ones -- ``clamp_norm_factor`` 0.75, ``v_lr`` 0.1, and its weight
decay.  The reference's decay term is ``0.5 ‖δ‖ / ‖h‖²``; this project's is
the squared relative norm ``w ‖δ‖² / ‖h‖²`` (memit.py), so ``w`` is the value
that equals the reference's term at the clamp radius ``‖δ‖ = 0.75 ‖h‖`` on
SmolLM2-135M (``‖h‖`` ≈ 139 at layer 7): ``w = 0.5 / (0.75 · 139) ≈ 5e-3``.
The optimization stops once every edit's total loss (NLL + KL + decay) is
below ``v_loss_threshold``, as the reference's ``loss < 5e-2``.

Differences from the reference implementation (``AlphaEdit_main.py``), on purpose:

* ``P`` is computed with ``eigh`` of the symmetric ``C`` instead of an SVD
  (the same vectors for a positive semi-definite matrix) from the project's
  key statistics (``stats_tokens`` of the retain corpus), not 100k Wikipedia
  samples;
* ``K_p`` is kept as the keys themselves (rows), not as the running sum
  ``Σ K_p K_pᵀ`` (d x d per layer): the same normal equations, smaller for
  fewer edits than the key width;
* the threshold is absolute, as in the reference (2e-2 for Llama-3-8B); its
  meaning depends on the scale of a model's keys, so the default here was
  chosen on SmolLM2-135M (below) and the record reports the null-space
  dimension of every layer.  A threshold that leaves an empty null space is
  an error, not a silent no-op;
* MEMIT's deviations in the target stage (fixed evaluator prompt, KL over the
  whole essence prompt, squared relative decay) apply here too.

Defaults on the built-in SmolLM2-135M: MEMIT's layer range 3-7; see
``docs/editing.md`` for the measurements (one batch of 10, and two
sequential batches with and without ``K_p``:
``benchmarks/alphaedit_sequential.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from shared.interventions import register
from shared.interventions._memit_stats import TensorCache, cached_key_second_moments, windows_digest
from shared.interventions.base import layer_indices
from shared.interventions.memit import (
    MEMIT,
    STATS_CORPUS,
    EditSite,
    EditTargetParams,
    LayerSolver,
    keys_and_values,
)
from shared.lineage_state import Lineage, LineageEntry

#: the reference's weight decay for Llama-3-8B (``v_weight_decay`` 0.5 on ``‖δ‖ / ‖h‖²``) at the clamp radius
#: ``‖δ‖ = 0.75 ‖h‖`` on SmolLM2-135M (mean ``‖h‖`` 139 at layer 7 on the built-in edits), written as this
#: project's squared relative norm: ``0.5 · 0.75‖h‖ / ‖h‖² = w · 0.75²``  =>  ``w = 0.5 / (0.75 · 139) ≈ 5e-3``
REFERENCE_DECAY_SMOLLM2 = 5e-3


class AlphaEditParams(EditTargetParams):
    """Hyperparameters of AlphaEdit (target stage: the reference's Llama-3-8B settings, not MEMIT's)."""

    layers: list[int] = Field(
        default_factory=lambda: [3, 4, 5, 6, 7],
        min_length=1,
        description="decoder layers whose MLP down_proj is edited (0-based); targets are set at the last",
    )
    v_lr: float = Field(0.1, gt=0, le=100.0, description="Adam learning rate of the target deltas (reference: 0.1)")
    v_weight_decay: float = Field(
        REFERENCE_DECAY_SMOLLM2, ge=0, le=1000.0,
        description="weight of ||delta||^2 / ||h||^2 in the target-value loss (the reference's 0.5 * ||delta|| / ||h||^2 "
                    "at the clamp radius on SmolLM2-135M)",
    )
    clamp_norm_factor: float = Field(
        0.75, gt=0, le=1000.0, description="||delta|| is clamped to this multiple of the original residual norm ||h||"
    )
    nullspace_threshold: float = Field(
        2e-2, gt=0, le=1e6, description="eigenvalues of E[k k^T] below this span the protected null space (absolute)"
    )
    l2: float = Field(10.0, gt=0, le=1e6, description="alpha: ridge term of (P (K K^T + K_p K_p^T) + alpha I)^-1")
    protect_previous_edits: bool = Field(
        True,
        description="add the keys of earlier AlphaEdit steps on this model's lineage (K_p) to the normal equations, "
                    "as the reference's sequential editing does",
    )

    @field_validator("layers")
    @classmethod
    def _distinct_non_negative(cls, v: list[int]) -> list[int]:
        return layer_indices(v)


def null_space_projector(cov: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """``P = Û Ûᵀ`` over the eigenvectors of ``cov`` with eigenvalue below ``threshold``; and their count."""
    values, vectors = torch.linalg.eigh(cov.double())
    small = vectors[:, values < threshold]
    return small @ small.T, int(small.shape[1])


def alphaedit_update(
    keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, l2: float, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """AlphaEdit's closed form ``ΔW = ((P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ)ᵀ`` (float64 solve).

    ``keys`` (n, d_in) and ``resid`` (n, d_out) as rows, ``projector`` (d_in, d_in),
    ``protected`` (n_p, d_in): the keys of earlier edits on this lineage (the
    reference's ``cache_c = Σ K_p K_pᵀ``), or None.  Returns ΔW (d_out, d_in) with
    ``ΔW x = 0`` for every ``x`` with ``P x = 0`` -- the directions where the
    preserved keys carry their energy -- so ``ΔW k₀ ≈ 0``; ``K_p`` additionally
    penalizes ``‖ΔW K_p‖`` (earlier edits' outputs) within the null space.
    """
    k = keys.double().T  # (d_in, n)
    p = projector.double().to(k.device)
    gram = k @ k.T
    if protected is not None and protected.numel():
        kp = protected.double().to(k.device).T  # (d_in, n_p)
        gram = gram + kp @ kp.T
    a = p @ gram + l2 * torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    upd = torch.linalg.solve(a, p @ k @ resid.double().to(k.device))  # (d_in, d_out)
    return upd.T


def _key_name(layer: int) -> str:
    return f"keys.layer{layer}"


def protected_keys(entry: LineageEntry | None, layer: int, width: int | None = None) -> torch.Tensor | None:
    """The keys of earlier AlphaEdit edits at ``layer`` recorded in a lineage entry (rows), or None.

    With ``width`` (the layer's key width) the keys are checked first: a state
    written for another model, or damaged, would silently protect the wrong keys.
    """
    keys = None if entry is None else entry.tensors.get(_key_name(layer))
    if keys is None or width is None:
        return keys
    from shared.finite import check_finite_tensors

    where = f"alphaedit: the lineage state's protected keys for layer {layer} (lineage_state/alphaedit.safetensors)"
    if keys.dim() != 2 or int(keys.shape[1]) != width:
        raise ValueError(f"{where} have shape {tuple(keys.shape)}; this model's keys there are {width} wide "
                         "(the state beside the checkpoint does not belong to it)")
    check_finite_tensors({_key_name(layer): keys}, where)
    return keys


@register
class AlphaEdit(MEMIT):
    """MEMIT with the update projected onto the null space of the layer's preserved keys (Fang et al., 2025)."""

    name = "alphaedit"
    params_model = AlphaEditParams
    #: 2: protected keys of earlier AlphaEdit steps (K_p) and the projector from the lineage's root, kept in the
    #: checkpoint's lineage state; the reference's target settings (clamp 0.75, v_lr 0.1, its decay); the stop
    #: rule on the total loss
    version = "2"
    uses_lineage_state = True

    def apply(
        self, model: Any, tokenizer: Any, params: Any, data: Any, cache: TensorCache | None = None,
        lineage: Lineage | None = None,
    ) -> dict[str, Any]:
        """MEMIT's stages with AlphaEdit's solve; ``lineage``: what earlier AlphaEdit steps left (None: nothing).

        The record's ``lineage_state`` is the new :class:`~shared.lineage_state.LineageEntry`
        (the executor writes it beside the checkpoint; to chain applications in
        memory pass it back as ``lineage=Lineage(entry=...)``).
        """
        context: dict[str, Any] = {"lineage": lineage or Lineage(), "cache": cache}
        record = self.edit(model, tokenizer, params, data, cache, context)
        record["lineage_state"] = context["new_entry"]
        return record

    def key_statistics(
        self, model: Any, windows: list[list[int]], layers: list[int], cache: TensorCache | None, context: dict[str, Any]
    ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
        """The statistics ``P`` comes from: the lineage root's (the model before its first AlphaEdit step).

        On the first AlphaEdit step of a lineage that is the model handed in.
        Later steps read the root's statistics from the store's content-keyed
        cache (under the root's digest; the root checkpoint is loaded only on a
        miss), or, in memory, from the entry's ``memory``.
        """
        lineage: Lineage = context["lineage"]
        entry = lineage.entry
        wd = windows_digest(windows)
        if entry is None:
            covs, info = cached_key_second_moments(model, windows, layers, STATS_CORPUS, cache)
            digest = lineage.model_digest or getattr(cache, "model_digest", "")
            if not digest:
                from shared.models import model_digest

                digest = model_digest(model)
            context["root"] = {"digest": digest, "key": lineage.parent_key}
            context["root_memory"] = {"covs": covs, "info": info, "windows": wd}
            info = {**info, "source": "input model (the lineage's root)"}
            return covs, info
        root = entry.meta.get("root")
        if not isinstance(root, dict) or not root.get("digest"):
            raise ValueError("alphaedit: the checkpoint's lineage state (lineage_state/alphaedit.safetensors) names no "
                             "root model, so the projector P cannot be rebuilt; it was not written by this version")
        context["root"] = root
        memory = entry.memory.get("root_statistics")
        if memory and memory["windows"] == wd and all(layer in memory["covs"] for layer in layers):
            covs = {layer: memory["covs"][layer] for layer in layers}
            info = {**memory["info"], "cache_hit": True, "computed_layers": [], "compute_seconds": 0.0}
        elif lineage.statistics_of is not None:
            covs, info = lineage.statistics_of(root["digest"], root.get("key", ""), windows, layers)
        else:
            raise ValueError(
                "alphaedit: this model has earlier AlphaEdit edits whose projector comes from the lineage's root "
                f"(model {root['digest'][:12]}), and no way to read that model's key statistics was given "
                "(run it through the store, or chain in memory with the same statistics windows and layers)"
            )
        context["root_memory"] = {"covs": covs, "info": info, "windows": wd}
        return covs, {**info, "source": f"lineage root {root['digest'][:12]}"}

    def layer_solver(
        self, covs: dict[int, torch.Tensor], params: Any, device: Any, context: dict[str, Any] | None = None
    ) -> tuple[LayerSolver, dict[str, Any]]:
        context = context if context is not None else {"lineage": Lineage()}
        entry = context["lineage"].entry
        projectors: dict[int, torch.Tensor] = {}
        dims: dict[str, int] = {}
        previous: dict[str, int] = {}
        kp: dict[int, torch.Tensor | None] = {}
        for layer in params.layers:
            p, dim = null_space_projector(covs[layer].to(device), params.nullspace_threshold)
            if dim == 0:
                raise ValueError(
                    f"nullspace_threshold: {params.nullspace_threshold} leaves layer {layer} no null space "
                    f"(smallest eigenvalue of E[k k^T] is {float(torch.linalg.eigvalsh(covs[layer].double()).min()):.3g}); "
                    "raise the threshold"
                )
            projectors[layer], dims[str(layer)] = p, dim
            keys = protected_keys(entry, layer, width=int(covs[layer].shape[0]))
            previous[str(layer)] = 0 if keys is None else int(keys.shape[0])
            kp[layer] = keys if params.protect_previous_edits else None

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            return alphaedit_update(keys, resid, projectors[layer], params.l2, kp[layer])

        width = int(next(iter(covs.values())).shape[0])
        root = context.get("root", {})
        return solve, {
            "nullspace_dim": dims,
            "key_dim": width,
            "nullspace_threshold": params.nullspace_threshold,
            "projector_source": root.get("digest", ""),
            "previous_keys": previous,
            "protected_previous_keys": sum(previous.values()) if params.protect_previous_edits else 0,
        }

    def after_spreading(self, model: Any, tokenizer: Any, sites: list[EditSite], params: Any,
                        context: dict[str, Any]) -> dict[str, Any]:
        """Append this batch's keys, measured on the edited model (as the reference's ``cache_c`` update), to K_p."""
        entry = context["lineage"].entry
        tensors = dict(entry.tensors) if entry is not None else {}
        for layer in params.layers:
            keys, _ = keys_and_values(model, tokenizer, sites, layer, layer)
            old = tensors.get(_key_name(layer))
            keys = keys.detach().float().cpu()
            tensors[_key_name(layer)] = keys if old is None else torch.cat([old.float(), keys])
        totals = {name[len("keys.layer"):]: int(t.shape[0]) for name, t in sorted(tensors.items())}
        meta = {
            "root": context["root"],
            "steps": (entry.meta.get("steps", 0) if entry is not None else 0) + 1,
            "keys": totals,
        }
        context["new_entry"] = LineageEntry(tensors, meta, {"root_statistics": context["root_memory"]})
        return {"protected_keys_after": totals}
