"""Registry of intervention methods, discovered from the modules of this package.

Adding a method = adding one module here that defines an
:class:`~shared.interventions.base.Intervention` subclass decorated with
:func:`register`.  Lookups go through :func:`get_intervention`; there is no
central if/elif chain.
"""

from __future__ import annotations

import importlib
import pkgutil

from shared.interventions.base import Category, Intervention, InterventionParams

_REGISTRY: dict[str, Intervention] = {}
_DISCOVERED = False


def register(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make an intervention available under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ValueError(f"intervention name {name!r} registered twice")
    _REGISTRY[name] = cls()
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _DISCOVERED = True


def available() -> dict[str, Intervention]:
    """All registered interventions by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_intervention(name: str) -> Intervention:
    """The intervention registered as ``name``; a clear error listing the choices otherwise."""
    registry = available()
    if name not in registry:
        raise KeyError(f"unknown intervention {name!r}; available: {', '.join(registry)}")
    return registry[name]


__all__ = ["Category", "Intervention", "InterventionParams", "available", "get_intervention", "register"]
