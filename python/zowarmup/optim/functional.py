"""The ZO arithmetic, once: every caller (``ZOOptimizer``, the exact mode, the federated client and
server) computes projected gradients and update coefficients with these functions.

See docs/DESIGN.md, "The ZO step". For S samples with noise scale ``c`` and finite-difference
``eps``, sample ``s`` perturbs the weights to ``w +- eps*c*z_s`` and the projected gradient is::

    g_s = (L(w + eps c z_s) - L(w - eps c z_s)) / (2 eps)                 # projected_grad

The update along ``z_s`` is (``weight`` is a client's ``n_i / sum n`` in a federation, or the ratio
``eps_ref / eps_k`` of a parameter group; ``server_lr`` the server's step in a federation)::

    coeff_s = -server_lr * lr * c * g_s * weight / S                       # update_coeff

evaluated left to right in float64 (Python floats or numpy float64 arrays) and rounded to float32
once, by the kernel. Weight decay multiplies the restored weights by ``1 - lr * wd``
(:func:`decay_factor`). The fused final pass of a step restores the last perturbation and applies
the update in one kernel call (:func:`final_pass`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["projected_grad", "update_coeff", "update_coeffs", "update_coeffs_array", "decay_factor",
           "final_pass"]


def projected_grad(loss_plus: float, loss_minus: float, eps: float) -> float:
    """``(loss_plus - loss_minus) / (2 * eps)``: the SPSA estimate of the directional derivative
    along the sample's noise (in units of ``c * z``)."""
    return (loss_plus - loss_minus) / (2.0 * eps)


def update_coeff(g, lr: float, scale: float, num_samples: int, weight: float = 1.0,
                 server_lr: float = 1.0):
    """``-server_lr * lr * scale * g * weight / num_samples``, left to right in float64.

    ``g`` is a float or a numpy float64 array (then the result is an array of the same shape).
    """
    return -server_lr * lr * scale * g * weight / num_samples


def update_coeffs(grads: Sequence[float], lr: float, scale: float, weight: float = 1.0,
                  server_lr: float = 1.0, num_samples: int | None = None) -> list[float]:
    """:func:`update_coeff` for each of S projected gradients (``num_samples`` defaults to S)."""
    n = len(grads) if num_samples is None else num_samples
    return [update_coeff(g, lr, scale, n, weight, server_lr) for g in grads]


def update_coeffs_array(grads: np.ndarray, lr: float, scale: float, num_samples: int,
                        weight: float = 1.0, server_lr: float = 1.0) -> np.ndarray:
    """:func:`update_coeff` over a float array of projected gradients, as float64."""
    return update_coeff(np.asarray(grads, dtype=np.float64), lr, scale, num_samples, weight,
                        server_lr)


def decay_factor(lr: float, weight_decay: float) -> float:
    """``1 - lr * weight_decay``: the multiplier of the restored weights in the final pass."""
    return 1.0 - lr * weight_decay


def final_pass(last_seed: int, eps_c: float, seeds: Sequence[int], coeffs: Sequence[float]
               ) -> tuple[list[int], list[float]]:
    """The (seeds, coeffs) of a step's one fused final pass: restore ``+eps*c*z(last_seed)`` (the
    weights sit at ``w - eps*c*z(last_seed)`` after the last L- evaluation) and add the update."""
    return [int(last_seed)] + [int(s) for s in seeds], [float(eps_c)] + [float(c) for c in coeffs]
