"""KFP components: one per intervention, one per evaluator, plus base-model preparation and aggregation.

Each component is a thin typed wrapper over one entry point of ``shared``.
Modules declare what they wrap with a module-level ``METHOD`` (interventions)
or ``EVALUATOR`` (evaluators); the pipeline builder finds them through
:func:`intervention_component` / :func:`evaluator_component`, so adding an
intervention means adding its module here -- no central if/elif chain.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _discover() -> tuple[dict[str, Any], dict[str, Any]]:
    interventions: dict[str, Any] = {}
    evaluators: dict[str, Any] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "METHOD"):
            interventions[module.METHOD] = getattr(module, module.METHOD)
        if hasattr(module, "EVALUATOR"):
            evaluators[module.EVALUATOR] = getattr(module, f"evaluate_{module.EVALUATOR}")
    return interventions, evaluators


def intervention_components() -> dict[str, Any]:
    return dict(_discover()[0])


def evaluator_components() -> dict[str, Any]:
    return dict(_discover()[1])


def intervention_component(method: str) -> Any:
    comps = intervention_components()
    if method not in comps:
        raise KeyError(f"no KFP component for intervention {method!r}; components exist for: {', '.join(sorted(comps))}")
    return comps[method]


def evaluator_component(name: str) -> Any:
    comps = evaluator_components()
    if name not in comps:
        raise KeyError(f"no KFP component for evaluator {name!r}; components exist for: {', '.join(sorted(comps))}")
    return comps[name]
