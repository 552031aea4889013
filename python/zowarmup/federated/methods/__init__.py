"""The registry of federated methods: one module per method family, one line per module here.

Every place that needs to know a method (config validation, the round driver, the server's seed
pool, message limits, deployments, tables and plots) reads it from :data:`REGISTRY`. To add a
method, write a module beside these that defines its :class:`~.base.Method` (and, for a new kind of
round, its :class:`~.base.Phase`: a ``run_round`` through the driver), and add one line to
``_METHODS`` below (see docs/DESIGN.md, "Adding a method").
"""
from __future__ import annotations

from . import fedkseed, heterofl, hilo, warmup, zo
from .base import Method, Phase

_METHODS = (
    zo.ZOWARMUP,
    warmup.HIGH_RES_ONLY,
    zo.ZO_ONLY,
    fedkseed.FEDKSEED,
    fedkseed.ZOWARMUP_FEDKSEED,
    hilo.ZOWARMUP_HILO,
    heterofl.HETEROFL,
)

#: name -> Method, in the order of the table in the docs.
REGISTRY: dict[str, Method] = {m.name: m for m in _METHODS}
#: phase name -> Phase (the warm-up phase first).
PHASES: dict[str, Phase] = {warmup.PHASE.name: warmup.PHASE,
                            **{m.phase2.name: m.phase2 for m in REGISTRY.values() if m.phase2}}

__all__ = ["Method", "Phase", "REGISTRY", "PHASES", "get", "deployable_methods", "require_deployable"]


def get(name: str) -> Method:
    """The method called ``name``; ValueError listing the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}") from None


def deployable_methods() -> tuple[str, ...]:
    """Names of the methods a deployment (Flower, the in-memory transport) runs."""
    return tuple(n for n, m in REGISTRY.items() if m.deployable)


def require_deployable(name: str, where: str = "deployments") -> Method:
    """The method called ``name`` if a deployment runs it; ValueError naming the ones that do."""
    m = get(name)
    if not m.deployable:
        raise ValueError(f"method {name!r} runs embedded only; {where} support "
                         f"{', '.join(deployable_methods())}")
    return m
