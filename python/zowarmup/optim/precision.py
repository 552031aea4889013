"""Precision checks of the ZO step: warn when the perturbation rounds away in low-precision weights.

A weight ``w`` of a dtype with ``m`` mantissa bits does not move under ``w +- d`` when ``d`` is
below half an ulp of ``w``; such a weight sees no perturbation, contributes nothing to ``L+ - L-``
and gets no gradient signal (docs/DESIGN.md, "The ZO step"). :func:`warn_vanishing_perturbation`
estimates, once per (group, dtype, ``eps*scale``), the share of weights where ``d = eps*scale``
vanishes and warns above :data:`PRECISION_WARN_FRACTION`.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

__all__ = ["PRECISION_WARN_FRACTION", "warn_vanishing_perturbation"]

#: Share of a group's weights whose ±eps*scale perturbation rounds away (below half an ulp) above
#: which ZOOptimizer warns (once per group, dtype and eps*scale value).
PRECISION_WARN_FRACTION = 0.10
# Weights sampled per tensor (evenly strided) to estimate that share. A full chunked scan took 10 s
# for 75M fp32 weights here (small-op overhead); the strided sample is one small op per tensor.
_CHECK_SAMPLE = 4096


def _vanish_threshold(d: float, dtype: torch.dtype) -> float:
    """Smallest magnitude from which adding ``±d`` to a ``dtype`` value rounds back to the value.

    For ``|p|`` in ``[2**e, 2**(e+1))`` the ulp is ``2**(e - m)`` (``m`` mantissa bits), and
    ``p ± d`` rounds to ``p`` when ``d < ulp / 2``; that holds for every ``e >= floor(log2 d) + m + 2``
    (except the step toward zero from an exact power of two, where the spacing below is halved).
    """
    m = round(-math.log2(torch.finfo(dtype).eps))
    return math.ldexp(1.0, math.floor(math.log2(d)) + m + 2)


def _vanishing_share(ps: Sequence[torch.Tensor], thr: float) -> float:
    """Estimated share of the elements of ``ps`` with ``|w| >= thr``, from an evenly strided sample
    of up to :data:`_CHECK_SAMPLE` elements per tensor (a view: no copy)."""
    total = sum(p.numel() for p in ps)
    lost = 0.0
    with torch.no_grad():
        for p in ps:
            flat = p.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            sample = flat[::max(1, flat.numel() // _CHECK_SAMPLE)]  # a view, no copy
            hit = int(torch.count_nonzero(sample.abs() >= thr))
            lost += hit / sample.numel() * flat.numel()
    return lost / total


def warn_vanishing_perturbation(groups: Sequence[Sequence[torch.Tensor]],
                                eps_c: Sequence[float], warned: set, stacklevel: int = 2) -> None:
    """Warn when ``eps_c[k]`` is below half an ulp for a sizable share of group ``k``'s weights.

    Args:
        groups: the parameter tensors of each group (any supported float dtype, mixed allowed).
        eps_c: per group, the perturbation magnitude ``eps * scale`` (a Python float).
        warned: the keys ``("precision", k, dtype, eps_c[k])`` already checked; updated in place,
            so each (group, dtype, magnitude) is checked, and warned about, once.
        stacklevel: as for :func:`warnings.warn`, counted from the caller of this function.
    """
    for gi, (ps_all, d) in enumerate(zip(groups, eps_c)):
        by_dtype: dict = {}
        for p in ps_all:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, ps in by_dtype.items():
            key = ("precision", gi, dtype, d)
            if key in warned:
                continue
            warned.add(key)
            if sum(p.numel() for p in ps) == 0:
                continue
            thr = _vanish_threshold(d, dtype)
            share = _vanishing_share(ps, thr)
            if share > PRECISION_WARN_FRACTION:
                warnings.warn(
                    f"ZOOptimizer: in param group {gi}, eps*scale = {d:.3g} is below half an "
                    f"ulp for {share:.0%} of the {dtype} weights (every |w| >= {thr:g}); "
                    "their perturbation rounds away and they get no gradient signal. Use a "
                    "larger eps or float32 weights", RuntimeWarning, stacklevel=stacklevel + 1)
