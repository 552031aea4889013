"""Exact ZO evaluation: perturbed weights live in one reused scratch buffer, stored weights never move.

The in-place SPSA step (``ZOOptimizer.estimate``) perturbs the weights by ``+eps c z``, then
``-2 eps c z``, then restores with ``+eps c z``. Floating-point addition does not undo itself, so
about 60% of float32 elements end one rounding step away from where they started (docs/DESIGN.md,
"The ZO step"). A client that keeps its own copy of the global model and must stay bit-identical
to the server's therefore either snapshots its parameters (one extra copy of the model) or uses
this module.

:class:`ScratchPerturbation` registers a forward pre-hook and a forward hook on every module that
owns parameters. While a perturbation ``(seed, alpha)`` is active, the pre-hook writes each of the
module's parameters, perturbed, into a slice of one scratch buffer::

    scratch <- p                                          # copy
    apply_seeds_(scratch, [seed], [alpha], offset=base_p)  # p + alpha z(seed), one rounding

and points the module at the slice for the duration of its forward; the forward hook points it back.
``base_p`` is the parameter's global offset in the flat vector over ``model.parameters()``
(``zo_kernels.offsets``), so the noise is exactly the one ``apply_seeds_`` over the whole model
would add, and the perturbed value of every element is ``fl(w + alpha z)``, bit for bit the value
an in-place ``perturb_`` from ``w`` produces. The stored parameters are never written.

The scratch buffer is allocated like a stack: a module's slices are pushed when its forward starts
and popped when it ends, so the buffer's size is the largest sum of directly owned parameter bytes
along any chain of nested modules -- in practice the largest layer (ResNet-18: one 512x512x3x3
convolution, 9.4 MB of its 44.7 MB; the digits MLP: the 64x128 layer). It is allocated once per
:class:`ScratchPerturbation` and reused by every forward and every seed.

Local updates before the perturbation (a client's own update between local steps) are supported
by ``pre``: a list of (seeds, coeffs) batches applied to the scratch copy, one ``apply_seeds_``
call per batch in order, before the perturbation -- the same sequence of operations, hence the same
bits, as applying those batches in place and then perturbing.

Requirement: a parameter is used only inside the forward of the module that owns it (or of a
module nested in that forward). That holds for every model in :mod:`zowarmup.models` and for
standard layers; a model that reads another module's parameter from outside (e.g. a tied
embedding read by a head through ``F.linear(x, self.embed.weight)``) would see the unperturbed
value there -- :func:`check_exact_supported` detects it, and :func:`require_exact_supported`
(called wherever exact mode is switched on: :class:`.replica.ClientReplica`, the embedded
:class:`.loop.Runner`) turns it into an error before any training.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import nn

import zo_kernels

from .functional import spsa_grads

_ALIGN = 64  # bytes: every slice starts on a cache line (and any dtype's alignment)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class ScratchPerturbation:
    """Evaluate a model at ``w + alpha z(seed)`` without touching ``w``.

    Args:
        model: the model; its parameters (``model.parameters()`` order) form the flat vector.
        dist: ``"rademacher"`` or ``"gaussian"`` (the noise stream of ``zo_kernels``).
        backend: ``zo_kernels`` backend (None: per device).

    Use::

        sp = ScratchPerturbation(model)
        with sp.hooks():
            with sp.perturb(seed, +a):
                lp = loss(model)          # every forward sees w + a z(seed)
            with sp.perturb(seed, -a):
                lm = loss(model)
        # outside perturb() the model is evaluated at w as usual

    Attributes:
        scratch_bytes: size of the scratch buffer (bytes).
        overflow_bytes: bytes allocated outside the buffer because a call pattern nested deeper
            than the module tree (0 for ordinary models).
    """

    def __init__(self, model: nn.Module, dist: str = "rademacher", backend: str | None = None):
        self.model = model
        self.dist = dist
        self.backend = backend
        params = list(model.parameters())
        if not params:
            raise ValueError("ScratchPerturbation: the model has no parameters")
        self.device = params[0].device
        self._base = {id(p): o for p, o in zip(params, zo_kernels.offsets(params))}
        self._own: dict[int, list[tuple[str, torch.Tensor, int]]] = {}
        for m in model.modules():
            own = [(n, p, self._base[id(p)]) for n, p in m.named_parameters(recurse=False)
                   if id(p) in self._base]
            if own:
                self._own[id(m)] = own
        self.scratch_bytes = self._need(model, set())
        self._buf: torch.Tensor | None = None
        self._top = 0
        self._stack: list[tuple[nn.Module, list, int]] = []
        self._active: tuple | None = None  # (pre batches, seed, alpha)
        self.overflow_bytes = 0

    def _need(self, m: nn.Module, seen: set) -> int:
        if id(m) in seen:
            return 0
        seen = seen | {id(m)}
        own = sum(_aligned(p.numel() * p.element_size()) for _, p, _ in self._own.get(id(m), []))
        kids = [self._need(c, seen) for c in m.children()]
        return own + max(kids, default=0)

    # -- hooks -----------------------------------------------------------------------------------
    def _alloc(self, p: torch.Tensor) -> torch.Tensor:
        n = _aligned(p.numel() * p.element_size())
        if self._buf is not None and self._top + n <= self._buf.numel():
            v = self._buf[self._top:self._top + p.numel() * p.element_size()]
            self._top += n
            return v.view(p.dtype).view(p.shape)
        self.overflow_bytes += n
        return torch.empty_like(p, memory_format=torch.contiguous_format)

    def _pre(self, module: nn.Module, args):
        if self._active is None:
            return None
        own = self._own.get(id(module))
        if not own:
            return None
        pre, seed, alpha = self._active
        top = self._top
        saved = []
        with torch.no_grad():
            for name, p, base in own:
                v = self._alloc(p)
                v.copy_(p)
                for seeds, coeffs in pre:
                    zo_kernels.apply_seeds_(v, seeds, coeffs, 1.0, self.dist, self.backend, base)
                zo_kernels.apply_seeds_(v, [seed], [alpha], 1.0, self.dist, self.backend, base)
                saved.append((name, module._parameters[name]))
                module._parameters[name] = v
        self._stack.append((module, saved, top))
        return None

    def _post(self, module: nn.Module, args, output):
        if not self._stack or self._stack[-1][0] is not module:
            return None
        _, saved, top = self._stack.pop()
        for name, p in saved:
            module._parameters[name] = p
        self._top = top
        return None

    def _restore_all(self) -> None:
        while self._stack:
            module, saved, top = self._stack.pop()
            for name, p in saved:
                module._parameters[name] = p
            self._top = top
        self._top = 0

    @contextmanager
    def hooks(self):
        """Register the hooks and allocate the scratch buffer for the duration of the block."""
        handles = []
        mods = {id(m): m for m in self.model.modules()}
        try:
            self._buf = torch.empty(self.scratch_bytes, dtype=torch.uint8, device=self.device)
            for mid in self._own:
                m = mods[mid]
                handles.append(m.register_forward_pre_hook(self._pre))
                handles.append(m.register_forward_hook(self._post, always_call=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            self._restore_all()
            self._active = None
            self._buf = None

    @contextmanager
    def perturb(self, seed: int, alpha: float,
                pre: Sequence[tuple[Sequence[int], Sequence[float]]] = ()):
        """Within the block (and inside :meth:`hooks`), forwards see
        ``apply(apply(w, pre...), [seed], [alpha])``; ``w`` itself is never written."""
        if self._buf is None:
            raise RuntimeError("ScratchPerturbation.perturb must run inside hooks()")
        self._active = (list(pre), int(seed), float(alpha))
        try:
            yield
        finally:
            self._active = None
            self._restore_all()


def exact_estimate(model: nn.Module, closure: Callable[[], float], seeds: Sequence[int],
                   eps: float, scale: float, dist: str = "rademacher",
                   backend: str | None = None,
                   pre: Sequence[tuple[Sequence[int], Sequence[float]]] = (),
                   perturbation: ScratchPerturbation | None = None) -> tuple[list[float], list[float]]:
    """Projected gradients ``g_s = (L(w + eps c z_s) - L(w - eps c z_s)) / (2 eps)`` with the
    perturbed weights in a scratch buffer (``w`` untouched, bit for bit).

    Args:
        model: evaluated by ``closure`` (forward-only, same batch every call, returns the loss).
        seeds: the S directions.
        eps, scale: finite-difference step and noise magnitude c (perturbation ``eps * c``).
        pre: (seeds, coeffs) batches applied to the scratch copy first (local updates).
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

    Compares its output with a copy of the model perturbed in place (one extra model copy: a
    one-time check, not for the training path). False means some parameter is read outside its
    owner's forward (see the module docstring).
    """
    import copy
    ref = copy.deepcopy(model).eval()
    zo_kernels.apply_seeds_([p.data for p in ref.parameters()], [seed], [alpha], 1.0, dist, backend)
    want = ref(x)
    model.eval()
    sp = ScratchPerturbation(model, dist, backend)
    with sp.hooks(), sp.perturb(seed, alpha):
        got = model(x)
    return bool(torch.equal(want, got))


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
            f"zo.exact: {type(model).__name__} is not supported by the exact (scratch-buffer) "
            "evaluation: a parameter is read outside the forward of the module that owns it (e.g. "
            "a tied weight used through F.linear, or a submodule's forward called directly), so "
            "the perturbed forwards would see unperturbed weights. Set zo.exact=false (in-place "
            "step with a parameter snapshot)")
