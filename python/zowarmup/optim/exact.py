"""Exact ZO evaluation: perturbed forwards read ``W + eps*c*z`` made on the fly; stored weights never move.

The in-place SPSA step (``ZOOptimizer.estimate``) perturbs the weights by ``+eps c z``, then
``-2 eps c z``, then restores with ``+eps c z``. Floating-point addition does not undo itself, so
about 60% of float32 elements end one rounding step away from where they started (docs/DESIGN.md,
"The ZO step"), and bfloat16/float16 weights walk away step after step. A client that keeps its
own copy of the global model and must stay bit-identical to the server's, a bf16 model, or ranks
that must stay bit-identical use this module (``ZOOptimizer(exact=True)``, ``zo.exact``).

The mechanism is :class:`.exact_chunked.ChunkedPerturbation`: while a perturbation ``(seed,
alpha)`` is active, every torch call that reads a parameter gets ``fl(w + alpha z)`` instead, made
chunk by chunk for Linear / Embedding rows and Conv output channels (at most ``chunk_bytes`` each,
4 MiB by default), whole for the other (small) reads; the noise index of each element is its
offset in the flat vector over ``model.parameters()`` (``zo_kernels.offsets``), so each perturbed
value is bit for bit what an in-place ``perturb_`` from ``w`` produces. The extra memory is bounded
by the chunk, not by the largest layer.

Local updates before the perturbation (a client's own update between local steps) are supported
by ``pre``: (seeds, coeffs) batches applied to each chunk, one ``apply_seeds_`` call per batch in
order, before the perturbation -- the same bits as applying them in place and then perturbing.

:class:`ScratchPerturbation` keeps the name and interface the federated client has used (``hooks()``,
``perturb(seed, alpha, pre)``) over the chunked mechanism. :func:`check_exact_supported` compares
the exact forward with the model perturbed in place (and restored); a model that reads a parameter
with torch functions disabled (``torch._C.DisableTorchFunction``) or through another tensor object
aliasing its memory (made with ``.detach()`` before training) is refused by
:func:`require_exact_supported`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import nn

import zo_kernels

from .exact_chunked import DEFAULT_CHUNK_BYTES, ChunkedPerturbation
from .functional import spsa_grads


class ScratchPerturbation:
    """Evaluate a model at ``w + alpha z(seed)`` without touching ``w``.

    Args:
        model: the model; its parameters (``model.parameters()`` order) form the flat vector.
        dist: ``"rademacher"`` or ``"gaussian"`` (the noise stream of ``zo_kernels``).
        backend: ``zo_kernels`` backend (None: per device).
        chunk_bytes: bound of one chunk of a chunked read (:mod:`.exact_chunked`).

    Use::

        sp = ScratchPerturbation(model)
        with sp.hooks():
            with sp.perturb(seed, +a):
                lp = loss(model)          # every forward sees w + a z(seed)
            with sp.perturb(seed, -a):
                lm = loss(model)

    Attributes:
        scratch_bytes: the chunk bound (bytes); the largest transient copy is reported by
            ``chunk_max_bytes`` / ``fallback_max_bytes`` of :attr:`chunked`.
        overflow_bytes: 0 (kept for callers of the earlier scratch-buffer implementation).
    """

    def __init__(self, model: nn.Module, dist: str = "rademacher", backend: str | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        params = list(model.parameters())
        if not params:
            raise ValueError("ScratchPerturbation: the model has no parameters")
        self.model = model
        #: The :class:`.exact_chunked.ChunkedPerturbation` doing the work.
        self.chunked = ChunkedPerturbation(params, None, dist, backend, chunk_bytes)
        self.scratch_bytes = int(chunk_bytes)
        self.overflow_bytes = 0

    @contextmanager
    def hooks(self):
        """Kept for the earlier interface: nothing needs registering."""
        yield self

    @contextmanager
    def perturb(self, seed: int, alpha: float,
                pre: Sequence[tuple[Sequence[int], Sequence[float]]] = ()):
        """Within the block, forwards see ``apply(apply(w, pre...), [seed], [alpha])``; ``w``
        itself is never written."""
        with self.chunked.perturb(int(seed), float(alpha), pre):
            yield


def exact_estimate(model: nn.Module, closure: Callable[[], float], seeds: Sequence[int],
                   eps: float, scale: float, dist: str = "rademacher",
                   backend: str | None = None,
                   pre: Sequence[tuple[Sequence[int], Sequence[float]]] = (),
                   perturbation: ScratchPerturbation | None = None) -> tuple[list[float], list[float]]:
    """Projected gradients ``g_s = (L(w + eps c z_s) - L(w - eps c z_s)) / (2 eps)`` with the
    perturbed weights made on the fly (``w`` untouched, bit for bit).

    Args:
        model: evaluated by ``closure`` (forward-only, same batch every call, returns the loss).
        seeds: the S directions.
        eps, scale: finite-difference step and noise magnitude c (perturbation ``eps * c``).
        pre: (seeds, coeffs) batches applied first (local updates).
        perturbation: a :class:`ScratchPerturbation` to reuse (built here when None).

    Returns:
        (grads, losses): S projected gradients (Python floats; NaN from the first non-finite
        loss on) and the losses evaluated (L+, L- per seed, in order).
    """
    sp = perturbation or ScratchPerturbation(model, dist, backend)
    a = float(eps) * float(scale)
    losses: list[float] = []
    with sp.hooks():
        # the SPSA evaluation order of the in-place step: L+ then L- per seed, stop at the first
        # non-finite loss (docs/DESIGN.md, "Exact mode")
        for seed, alpha in [(int(s), alpha) for s in seeds for alpha in (+a, -a)]:
            with sp.perturb(seed, alpha, pre):
                losses.append(float(closure()))
            if not math.isfinite(losses[-1]):
                break
    losses, grads, _ = spsa_grads(losses, float(eps))
    grads += [math.nan] * (len(seeds) - len(grads))
    return grads, losses


@torch.no_grad()
def check_exact_supported(model: nn.Module, x: torch.Tensor, seed: int = 12345,
                          alpha: float = 1e-2, dist: str = "rademacher",
                          backend: str | None = None) -> bool:
    """True when the exact mode evaluates ``model`` at ``w + alpha z`` for input ``x``.

    Compares its output with the model perturbed in place and restored from a copy of its
    parameters (a one-time check, not for the training path): equal, or off by less than 1e-3 of the
    perturbation's own effect on the output (chunked matrix products may round differently from
    whole ones). False means some read did not see the perturbation (see the module docstring).
    """
    params = list(model.parameters())
    model.eval()
    base = model(x)
    saved = [p.detach().clone() for p in params]  # the reference perturbs the model itself (so
    try:                                          # aliases of its memory see it), then restores
        zo_kernels.apply_seeds_([p.data for p in params], [seed], [alpha], 1.0, dist, backend)
        want = model(x)
    finally:
        for p, v in zip(params, saved):
            p.data.copy_(v)
    sp = ScratchPerturbation(model, dist, backend)
    with sp.hooks(), sp.perturb(seed, alpha):
        got = model(x)
    if torch.equal(want, got):
        return True
    effect = float((want.double() - base.double()).abs().max())
    err = float((got.double() - want.double()).abs().max())
    return bool(math.isfinite(err) and err <= 1e-3 * effect)


def require_exact_supported(model: nn.Module, x: torch.Tensor, dist: str = "rademacher",
                            backend: str | None = None) -> None:
    """Raise ``ValueError`` unless :func:`check_exact_supported` holds for ``model`` on input
    ``x`` (a few samples). Once, where exact mode is switched on, before any training; the
    model's train/eval mode is restored. ``backend`` as in the config (``"auto"``: the default)."""
    was = model.training
    try:
        ok = check_exact_supported(model, x, dist=dist, backend=zo_kernels.normalize_backend(
            backend, "require_exact_supported"))
    finally:
        model.train(was)
    if not ok:
        raise ValueError(
            f"zo.exact: {type(model).__name__} is not supported by the exact evaluation: its "
            "forward reads a parameter with torch functions disabled or through another tensor "
            "aliasing its memory (e.g. made with .detach() before training), so the perturbed "
            "forwards would see unperturbed weights. Set zo.exact=false (in-place step with a "
            "parameter snapshot)")
