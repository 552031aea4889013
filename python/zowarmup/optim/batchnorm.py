"""BatchNorm helpers for ZO training: keep the running statistics of norm layers from moving 2S
times per step (``ZOOptimizer.step`` calls the closure 2S times at perturbed weights).

- :func:`freeze_running_stats` - a context manager that restores the running statistics on exit.
- :func:`running_stats_once` - wraps a closure so that only its first call updates them.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["freeze_running_stats", "running_stats_once"]


def _stat_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running-statistics buffers (``running_mean``, ``running_var``, ``num_batches_tracked``)
    of every norm layer in ``module`` that tracks them, in ``module.modules()`` order."""
    bufs = []
    for m in module.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                b = getattr(m, name, None)
                if isinstance(b, torch.Tensor):
                    bufs.append(b)
    return bufs


@contextlib.contextmanager
def freeze_running_stats(module: torch.nn.Module):
    """Context manager: the running statistics of every BatchNorm/InstanceNorm layer in ``module``
    are the same on exit as on entry (bit for bit).

    Forwards inside still normalize as the mode says (batch statistics in ``train()``, running
    ones in ``eval()``); only the updates of ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` are undone on exit. It keeps a copy of those buffers (2 floats per
    channel, not of the weights).
    """
    saved = [(b, b.detach().clone()) for b in _stat_buffers(module)]
    try:
        yield module
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


class running_stats_once:  # noqa: N801 - used like a function
    """Wrap a closure so that only its first call updates BatchNorm running statistics.

    ``ZOOptimizer.step`` calls the closure 2S times at perturbed weights; wrapped, the running
    statistics get one momentum update per step (from the first forward, at ``w + eps*c*z_0``, an
    O(eps) difference from the unperturbed weights) instead of 2S. Create one per step::

        for x, y in loader:
            opt.step(running_stats_once(model, lambda: loss_fn(model(x), y)))

    Args:
        module: the model (its BatchNorm/InstanceNorm layers with ``track_running_stats``).
        closure: the zero-argument loss closure.
    """

    def __init__(self, module: torch.nn.Module, closure: Callable[[], torch.Tensor | float]):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"running_stats_once: module must be a torch.nn.Module, got "
                            f"{type(module).__name__}")
        if not callable(closure):
            raise TypeError(f"running_stats_once: closure must be callable, got {closure!r}")
        self.module = module
        self.closure = closure
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.calls == 1:
            return self.closure()
        with freeze_running_stats(self.module):
            return self.closure()
