"""Zeroth-order optimization: the functional core, the optimizer and its evaluation modes.

- :mod:`.functional` - the ZO arithmetic and the in-place step as plain functions (SPSA estimate,
  update coefficients, fused final pass), the one copy every caller uses.
- :mod:`.optimizer` - :class:`ZOOptimizer`, a ``torch.optim.Optimizer`` over the functional core.
- :mod:`.exact` - exact evaluation: perturbed forwards that never write the stored weights.
- :mod:`.distributed` - data-parallel steps over ``torch.distributed`` (losses all-reduced).
- :mod:`.precision` - the warning for perturbations that round away
  (:data:`PRECISION_WARN_FRACTION`).
- :mod:`.batchnorm` - BatchNorm helpers :func:`freeze_running_stats`, :func:`running_stats_once`.
"""
from .batchnorm import freeze_running_stats, running_stats_once
from .optimizer import ZOEstimate, ZOOptimizer
from .precision import PRECISION_WARN_FRACTION

__all__ = ["ZOOptimizer", "ZOEstimate", "freeze_running_stats", "running_stats_once",
           "PRECISION_WARN_FRACTION"]
