"""The ZO arithmetic, once: every caller (``ZOOptimizer``, the exact mode, the federated client and
server) computes projected gradients, update coefficients and weight passes with these functions.

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

The in-place step, as plain functions over plain data (the ``sgd()`` beside ``torch.optim.SGD``):

- :class:`GroupHypers` - one parameter group's ``lr``, ``eps``, ``scale``, ``weight_decay``
  (Python floats); :class:`FlatParams` - the groups' tensors laid out as one flat noise vector.
- :func:`spsa_estimate` - the 2S closure calls at ``w +- eps*c*z_s`` and their projected
  gradients (:func:`spsa_grads` turns a list of losses into gradients, for the exact mode too).
- :func:`group_update` - one group's update coefficients and decay.
- :func:`apply_update` - the update in one pass, optionally fused with the restore of the last
  perturbation (the final pass of a step); :func:`zo_step` - estimate plus fused final pass.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

import zo_kernels

from .distributed import all_reduce_losses, reduce_device

__all__ = ["projected_grad", "update_coeff", "update_coeffs", "update_coeffs_array", "decay_factor",
           "final_pass", "FP32_MAX", "GroupHypers", "FlatParams", "flat_params", "apply_groups",
           "SPSAResult", "spsa_grads", "spsa_estimate", "group_update", "apply_update", "zo_step"]

#: Largest finite float32: a coefficient above it would round to inf in the kernel.
FP32_MAX = float(torch.finfo(torch.float32).max)


# ------------------------------------------------------------------------------------------------
# scalar arithmetic
# ------------------------------------------------------------------------------------------------
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
    weights sit at ``w - eps*c*z(last_seed)`` after the last L- evaluation) and add the update.

    The restore and the update's term of ``last_seed`` move the weights along the same noise
    direction, so they are one term: ``last_seed`` leads with the coefficient ``eps_c + coeff``
    (float64 sum, rounded to float32 once by the kernel), followed by the other seeds in order. The
    pass sums S terms per element, not S + 1 (S = 1: one term)."""
    if len(seeds) != len(coeffs):
        raise ValueError(f"final_pass: {len(seeds)} seeds but {len(coeffs)} coefficients")
    last = int(last_seed)
    out_seeds, out_coeffs = [last], [float(eps_c)]
    for s, c in zip(seeds, coeffs):
        if int(s) == last:
            out_coeffs[0] += float(c)
        else:
            out_seeds.append(int(s))
            out_coeffs.append(float(c))
    return out_seeds, out_coeffs


# ------------------------------------------------------------------------------------------------
# plain data: per-group hyper-parameters and the flat parameter vector
# ------------------------------------------------------------------------------------------------
class GroupHypers(NamedTuple):
    """One parameter group's hyper-parameters, as Python floats (validated by the caller).

    Attributes:
        lr: learning rate, ``>= 0``.
        eps: finite-difference step, ``> 0``; the group is perturbed by ``eps * scale * z``.
        scale: noise magnitude ``c``, ``> 0``.
        weight_decay: decoupled decay, ``>= 0``; the final pass multiplies by ``1 - lr * wd``.
    """
    lr: float
    eps: float
    scale: float
    weight_decay: float

    @property
    def eps_c(self) -> float:
        """``eps * scale``: the magnitude of the group's perturbation (float64 product)."""
        return self.eps * self.scale


class FlatParams(NamedTuple):
    """Parameter groups laid out as one flat noise vector (docs/DESIGN.md, "Noise stream").

    The tensors, in group order then tensor order, are one flat vector; every tensor starts on a
    128-element block (:func:`zo_kernels.offsets`), so a group's noise is the same whether it is
    updated alone or with the others. Build with :func:`flat_params`.

    Attributes:
        tensors: per group, the detached tensors (float32/bfloat16/float16, contiguous, one device).
        offsets: per group, the global flat index of each tensor's element 0.
        dist: ``"rademacher"`` or ``"gaussian"``.
        backend: a ``zo_kernels`` backend name, or None (automatic per device).
    """
    tensors: tuple
    offsets: tuple
    dist: str
    backend: str | None

    @property
    def device(self) -> torch.device:
        """The tensors' device (the CPU when there is no tensor)."""
        for ts in self.tensors:
            if ts:
                return ts[0].device
        return torch.device("cpu")


def flat_params(groups: Sequence[Sequence[torch.Tensor]], dist: str = "rademacher",
                backend: str | None = None) -> FlatParams:
    """:class:`FlatParams` over ``groups`` (lists of tensors; parameters are detached, no copy)."""
    ts = [tuple(p.detach() for p in g) for g in groups]
    flat = [t for g in ts for t in g]
    offs = zo_kernels.offsets(flat) if flat else []
    out, i = [], 0
    for g in ts:
        out.append(tuple(offs[i:i + len(g)]))
        i += len(g)
    return FlatParams(tuple(ts), tuple(out), dist, backend)


def apply_groups(params: FlatParams, seeds: Sequence[int], coeffs: Sequence[Sequence[float]],
                 decays: Sequence[float]) -> None:
    """``w_k = w_k * decays[k] + sum_j coeffs[k][j] * z(seeds[j])`` for every group ``k``, in place.

    Args:
        params: the groups (:func:`flat_params`).
        seeds: J seeds, ints in ``[0, 2**64)``.
        coeffs: per group, J finite coefficients (Python floats; rounded to float32 by the kernel).
        decays: per group, the decay multiplier.

    Consecutive groups with equal coefficients and decay share one :func:`zo_kernels.apply_seeds_`
    call at the global offset of their first tensor, so the noise is that of one flat vector over
    all groups; the result is the same bits as one call per tensor.
    """
    runs: list[list] = []  # [key, offset of the first tensor or None, tensors]
    for ts, offs, cs, decay in zip(params.tensors, params.offsets, coeffs, decays):
        key = (tuple(cs), decay)
        if not runs or runs[-1][0] != key:
            runs.append([key, None, []])
        if ts:
            if runs[-1][1] is None:
                runs[-1][1] = offs[0]
            runs[-1][2].extend(ts)
    for (cs, decay), offset, ts in runs:
        if ts:
            zo_kernels.apply_seeds_(ts, seeds, list(cs), decay, params.dist, params.backend,
                                    offset)


def _displace(params: FlatParams, eps_c: Sequence[float], seeds: Sequence[int],
              mults: Sequence[float]) -> None:
    """``w_k += sum_j mults[j] * eps_c[k] * z(seeds[j])`` for every group ``k``, decay 1."""
    apply_groups(params, seeds, [tuple(m * ec for m in mults) for ec in eps_c],
                 [1.0] * len(eps_c))


# ------------------------------------------------------------------------------------------------
# the closure's return value
# ------------------------------------------------------------------------------------------------
def _loss_value(out) -> float:
    """The closure's return value as a Python float, or TypeError saying what was returned."""
    if isinstance(out, torch.Tensor):
        if out.dim() != 0:
            raise TypeError(f"ZOOptimizer: the closure returned a tensor of shape {tuple(out.shape)}"
                            "; it must return the scalar loss (a 0-dim tensor or a float), "
                            "e.g. reduce it with .mean()")
        if out.is_complex() or out.dtype == torch.bool:
            raise TypeError(f"ZOOptimizer: the closure returned a 0-dim tensor of dtype {out.dtype}"
                            "; the loss must be real")
        return float(out.item())
    if isinstance(out, bool) or not isinstance(out, numbers.Real):
        text = repr(out)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise TypeError(f"ZOOptimizer: the closure returned {type(out).__name__} ({text}); it must "
                        "return the scalar loss as a 0-dim tensor or a float")
    return float(out)


def _closure_value(out) -> tuple[float, float | None]:
    """The closure's return value as ``(loss, n)``: ``n`` is None for a plain loss, else the
    sample count of ``(loss, n)`` (a non-negative finite number)."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"ZOOptimizer: the closure returned a tuple of {len(out)} items; it "
                            "must return the scalar loss, or (loss, n) with n the number of "
                            "samples the loss averages")
        loss = _loss_value(out[0])
        n = out[1]
        if isinstance(n, torch.Tensor) and n.dim() == 0 and not n.is_complex() \
                and n.dtype != torch.bool:
            n = n.item()
        if isinstance(n, bool) or not isinstance(n, numbers.Real):
            raise TypeError(f"ZOOptimizer: the closure returned (loss, n) with n of type "
                            f"{type(n).__name__}; n must be the number of samples (an int >= 0)")
        n = float(n)
        if not (math.isfinite(n) and n >= 0.0):
            raise ValueError(f"ZOOptimizer: the closure returned (loss, n) with n = {n!r}; n must "
                             "be the number of samples, finite and >= 0")
        return loss, n
    return _loss_value(out), None


def _evaluate(closure: Callable) -> tuple[float, float | None]:
    with torch.no_grad():
        out = closure()
    return _closure_value(out)


# ------------------------------------------------------------------------------------------------
# the SPSA estimate
# ------------------------------------------------------------------------------------------------
class SPSAResult(NamedTuple):
    """What :func:`spsa_estimate` and :func:`zo_step` return.

    Attributes:
        losses: the losses evaluated (Python floats; ``L+_0, L-_0, L+_1, ...``), ending at the
            first non-finite one.
        grads: one projected gradient per complete sample before it (Python floats).
        ok: every loss finite (and, for :func:`zo_step`, the update applied).
    """
    losses: list
    grads: list
    ok: bool


def spsa_grads(values: Sequence[float], eps: float) -> tuple[list[float], list[float], bool]:
    """Split the losses of an SPSA evaluation into losses, projected gradients and a finite flag.

    Args:
        values: losses in evaluation order ``L+_0, L-_0, L+_1, L-_1, ...`` (Python floats; may
            stop early or hold non-finite values).
        eps: the finite-difference step the gradients are relative to.

    Returns:
        ``(losses, grads, ok)``: ``values`` up to and including the first non-finite one, the
        :func:`projected_grad` of every complete pair before it, and whether all were finite.
    """
    losses: list[float] = []
    grads: list[float] = []
    for i, v in enumerate(values):
        losses.append(v)
        if not math.isfinite(v):
            return losses, grads, False
        if i % 2:
            grads.append(projected_grad(values[i - 1], v, eps))
    return losses, grads, True


def spsa_estimate(params: FlatParams, hypers: Sequence[GroupHypers], closure: Callable,
                  seeds: Sequence[int], eps: float, *, keep_last: bool = False,
                  process_group=None) -> SPSAResult:
    """Evaluate ``L+`` / ``L-`` for every seed in place (docs/DESIGN.md, "The ZO step").

    For each seed ``s``: one pass restores the previous sample and perturbs by ``+eps_c_k * z_s``
    (group ``k``'s ``eps * scale``), the closure gives ``L+``; one pass adds ``-2 eps_c_k z_s``,
    the closure gives ``L-``. That is 2S closure calls and 2S weight passes.

    Args:
        params: the groups' tensors (:func:`flat_params`).
        hypers: per group, its hyper-parameters (only ``eps * scale`` is used here).
        closure: runs the forward pass and returns the scalar loss (0-dim tensor or float), or
            ``(loss, n)`` with ``n`` the samples it averages; called under ``torch.no_grad()``.
        seeds: the S directions' seeds, ints in ``[0, 2**64)``, S >= 1.
        eps: the finite-difference step the projected gradients are relative to (the optimizer's
            default ``eps``; a group with another ``eps`` is corrected in :func:`group_update`).
        keep_last: leave the weights displaced by ``-eps_c * z(seeds[-1])`` when every loss is
            finite, for the fused final pass (:func:`apply_update` with ``restore_seed``).
        process_group: None, or a torch.distributed group whose ranks' losses are all-reduced
            (:func:`.distributed.all_reduce_losses`); every rank then evaluates all 2S losses.

    Returns:
        :class:`SPSAResult`. Without ``process_group`` the evaluation stops at the first
        non-finite loss. The weights are restored (up to restore rounding) unless ``keep_last``
        and ``ok``. On an exception the displacement is undone before it propagates.
    """
    local = process_group is None
    eps_c = [h.eps_c for h in hypers]
    evals: list = []  # (loss, n) per closure call, in call order
    disp = None  # (seed, sign): the weights are now w + sign * eps_c * z(seed)
    try:
        for seed in seeds:
            if disp is None:
                _displace(params, eps_c, [seed], (1.0,))
            else:  # restore the previous sample and perturb this one in one pass
                _displace(params, eps_c, [disp[0], seed], (1.0, 1.0))
            disp = (seed, 1.0)
            evals.append(_evaluate(closure))
            if local and not math.isfinite(evals[-1][0]):
                break
            _displace(params, eps_c, [seed], (-2.0,))
            disp = (seed, -1.0)
            evals.append(_evaluate(closure))
            if local and not math.isfinite(evals[-1][0]):
                break
        if local:
            values = [v for v, _ in evals]
        else:
            values = all_reduce_losses(evals, seeds, process_group,
                                       reduce_device(process_group, params.device))
    except BaseException:
        if disp is not None:
            _displace(params, eps_c, [disp[0]], (-disp[1],))
        raise
    losses, grads, ok = spsa_grads(values, eps)
    if disp is not None and (not ok or not keep_last):
        _displace(params, eps_c, [disp[0]], (-disp[1],))
    return SPSAResult(losses, grads, ok)


# ------------------------------------------------------------------------------------------------
# the update
# ------------------------------------------------------------------------------------------------
def group_update(hypers: GroupHypers, grads: Sequence[float], eps: float
                 ) -> tuple[list[float], float]:
    """One group's update: coefficients ``-lr*c*g_s*(eps/eps_k)/S`` and decay ``1 - lr*wd``.

    Args:
        hypers: the group's hyper-parameters (``lr`` already overridden where the caller wants).
        grads: S projected gradients relative to ``eps`` (Python floats).
        eps: the step ``grads`` are relative to; ``eps / hypers.eps`` rescales them to the group.

    Returns:
        (S coefficients as Python floats, the decay multiplier).
    """
    coeffs = update_coeffs(grads, hypers.lr, hypers.scale, weight=eps / hypers.eps)
    return coeffs, decay_factor(hypers.lr, hypers.weight_decay)


def apply_update(params: FlatParams, hypers: Sequence[GroupHypers], seeds: Sequence[int],
                 grads: Sequence[float], eps: float, *, restore_seed: int | None = None) -> bool:
    """Apply the update of S projected gradients, with weight decay, in one pass over the weights.

    Per group ``k``: ``w_k = decay_k * w_k + sum_s coeff_k,s * z(seeds[s])``
    (:func:`group_update`). With ``restore_seed`` the weights are taken to sit at
    ``w - eps_c_k * z(restore_seed)`` (after :func:`spsa_estimate` with ``keep_last``) and the same
    pass restores them: ``restore_seed`` leads the list with the coefficient
    ``eps_c_k * decay_k + coeff_k`` (restore and update along the same direction, one term,
    :func:`final_pass`), so the decay acts on the restored weights.

    Args:
        params, hypers: as for :func:`spsa_estimate`.
        seeds: S seeds; grads: S finite projected gradients relative to ``eps``.
        restore_seed: the last perturbation's seed, or None (weights not displaced).

    Returns:
        True when applied; False, with no update made (and the displacement undone), when a
        coefficient exceeds the float32 range.
    """
    seeds_k: list[int] = [int(s) for s in seeds]
    coeffs: list[list[float]] = []
    decays: list[float] = []
    for h in hypers:
        upd, decay = group_update(h, grads, eps)
        if restore_seed is not None:
            seeds_k, upd = final_pass(restore_seed, h.eps_c * decay, seeds, upd)
        coeffs.append(upd)
        decays.append(decay)
    if not all(abs(c) <= FP32_MAX for cs in coeffs for c in cs):
        if restore_seed is not None:
            _displace(params, [h.eps_c for h in hypers], [restore_seed], (1.0,))
        return False
    apply_groups(params, seeds_k, coeffs, decays)
    return True


def zo_step(params: FlatParams, hypers: Sequence[GroupHypers], closure: Callable,
            seeds: Sequence[int], eps: float, *, process_group=None) -> SPSAResult:
    """One in-place ZO step: 2S closure calls and 2S+1 weight passes, no extra tensors.

    :func:`spsa_estimate` with ``keep_last=True``, then :func:`apply_update` fused with the restore
    of the last perturbation (docs/DESIGN.md, "The ZO step"). Arguments as for
    :func:`spsa_estimate`. Returns its :class:`SPSAResult`, with ``ok`` False when the step was
    skipped (a non-finite loss, or an update beyond float32): then the weights are restored (up to
    restore rounding) and no update is made.
    """
    res = spsa_estimate(params, hypers, closure, seeds, eps, keep_last=True,
                        process_group=process_group)
    if res.ok:
        res = res._replace(ok=apply_update(params, hypers, seeds, res.grads, eps,
                                           restore_seed=seeds[-1]))
    return res
