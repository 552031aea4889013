"""BatchNorm during ZO rounds (``zo.bn_stats``): how the L+/L- forwards normalize, and the
statistics clients return when the server re-estimates them.

- ``frozen``: eval mode; every BatchNorm layer normalizes with the running statistics the warm-up
  left, which never change afterwards.
- ``batch``: train-mode BatchNorm without tracking: each micro-batch is normalized with its own
  statistics; the running statistics (used by the server's evaluation) are not touched.
- ``recompute``: the forwards as ``frozen``; in addition every participating client computes the
  statistics of its data under the round's global weights (:func:`local_statistics`) and the server
  sets its running statistics to their sample-weighted average (:func:`set_statistics`), as FedAvg
  averages buffers in the warm-up.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["bn_layers", "bn_mode", "local_statistics", "set_statistics", "statistics_size"]


def bn_layers(model: nn.Module) -> list:
    """The model's BatchNorm layers that track running statistics, in module order."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def statistics_size(model: nn.Module) -> int:
    """Floats in :func:`local_statistics`' result: mean and variance per channel per layer."""
    return sum(2 * m.num_features for m in bn_layers(model))


@contextmanager
def bn_mode(model: nn.Module, mode: str):
    """Put ``model`` in the evaluation mode ZO forwards use under ``zo.bn_stats = mode`` (eval mode
    for ``frozen``/``recompute``; for ``batch``: eval mode except BatchNorm layers, which run in
    train mode with tracking off) and restore the layers' flags afterwards."""
    model.eval()
    layers = bn_layers(model) if mode == "batch" else []
    for m in layers:
        m.train()
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in layers:
            m.track_running_stats = True
            m.eval()


@torch.no_grad()
def local_statistics(model: nn.Module, x: torch.Tensor, micro_batch: int) -> np.ndarray:
    """BatchNorm statistics of the data ``x`` under ``model``'s weights: for every layer its input
    mean and (unbiased) variance per channel, concatenated ``[mean_0, var_0, mean_1, ...]``
    (float32). Computed by a train-mode pass in micro-batches with a cumulative average
    (``momentum=None``), so exact for data that fits one micro-batch and the average of the
    micro-batch statistics otherwise. The model's buffers and flags are left as they were; the
    model ends in eval mode. A micro-batch of one sample is folded into the previous one."""
    layers = bn_layers(model)
    if not layers:
        return np.zeros(0, np.float32)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
              m.momentum) for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.eval()
        for m in layers:
            m.train()
        n = x.shape[0]
        bounds = list(range(0, n, micro_batch)) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
            del bounds[-2]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b - a >= 2:
                model(x[a:b])
        out = np.concatenate([np.concatenate([m.running_mean.float().cpu().numpy(),
                                              m.running_var.float().cpu().numpy()])
                              for m in layers]).astype(np.float32)
    finally:
        for m, (rm, rv, nb, mom) in zip(layers, saved):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.num_batches_tracked.copy_(nb)
            m.momentum = mom
        model.eval()
    return out


@torch.no_grad()
def set_statistics(model: nn.Module, stats: np.ndarray) -> None:
    """Write a :func:`local_statistics`-shaped vector into the model's running statistics."""
    off = 0
    for m in bn_layers(model):
        c = m.num_features
        m.running_mean.copy_(torch.from_numpy(stats[off:off + c]).to(m.running_mean))
        m.running_var.copy_(torch.from_numpy(stats[off + c:off + 2 * c]).to(m.running_var))
        off += 2 * c
    if off != stats.size:
        raise ValueError(f"set_statistics: {stats.size} values for {off} statistics")
