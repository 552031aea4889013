"""zowarmup: zeroth-order (forward-only) training at inference memory, and ZOWarmUp federated
pre-training.

Quick start::

    from zowarmup import ZOOptimizer

    opt = ZOOptimizer(model.parameters(), lr=1e-3, eps=1e-3)
    for x, y in loader:
        loss = opt.step(lambda: loss_fn(model(x), y))     # forward-only closure, no backward

Public names (imported lazily, so ``import zowarmup`` stays cheap and does not import torch):

- :class:`ZOOptimizer`, :class:`ZOEstimate` (``zowarmup.optim.optimizer``)
- :func:`freeze_running_stats`, :func:`running_stats_once` (BatchNorm helpers,
  ``zowarmup.optim.batchnorm``)
- :func:`derive_seed`, :func:`sample_seeds` (``zowarmup.seeds``)
"""
from __future__ import annotations

import importlib

from .seeds import derive_seed, sample_seeds

__version__ = "0.1.0"

_LAZY = {
    "ZOOptimizer": "zowarmup.optim.optimizer",
    "ZOEstimate": "zowarmup.optim.optimizer",
    "freeze_running_stats": "zowarmup.optim.batchnorm",
    "running_stats_once": "zowarmup.optim.batchnorm",
}

__all__ = ["ZOOptimizer", "ZOEstimate", "derive_seed", "sample_seeds", "freeze_running_stats",
           "running_stats_once", "__version__"]


def __getattr__(name: str):
    # PEP 562: import the torch-dependent modules on first use.
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'zowarmup' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
