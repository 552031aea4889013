"""Zeroth-order optimization: the functional core, the optimizer and its evaluation modes.

- :mod:`.functional` - the ZO arithmetic (projected gradient, update coefficients, final pass), the
  one copy every caller uses.
- :mod:`.optimizer` - :class:`ZOOptimizer`, a ``torch.optim.Optimizer`` over the functional core.
- :mod:`.exact` - exact evaluation: perturbed forwards that never write the stored weights.
- BatchNorm helpers :func:`freeze_running_stats`, :func:`running_stats_once`.
"""
from .optimizer import ZOEstimate, ZOOptimizer, freeze_running_stats, running_stats_once

__all__ = ["ZOOptimizer", "ZOEstimate", "freeze_running_stats", "running_stats_once"]
