"""Exact perturbed forwards at a fixed extra memory: ``W + alpha z`` made on the fly, chunk by chunk.

While a perturbation is active (:meth:`ChunkedPerturbation.perturb`), a ``TorchFunctionMode``
intercepts every torch call that reads one of the tracked parameters and gives it the perturbed
value instead of the stored one::

    value(p)[e] = fl(w[e] + alpha_p * z(seed)[base_p + e])           # after the ``pre`` batches

``base_p`` is the parameter's offset in the flat noise vector (``zo_kernels.offsets`` over the
tracked parameters, or offsets given by the caller), so each perturbed element is bit for bit what
an in-place ``apply_seeds_`` over the whole vector would write. **The stored parameters are never
written**: perturbed values live only in temporaries.

The big layers never exist perturbed as a whole:

- ``F.linear`` (``nn.Linear``, a tied output head): the weight's rows are made ``rows`` at a time
  (a contiguous slice: global offset ``base + r0 * in_features``), each chunk's GEMM writing its
  output columns straight into the output (``torch.mm(..., out=<strided column slice>)``; under
  autocast or mixed dtypes the chunk's output is computed and copied in); ``rows`` keeps both the
  weight chunk and the output chunk below ``chunk_bytes``.
- ``F.embedding`` (``nn.Embedding`` and subclasses such as OPT's learned positions): when the
  looked-up rows fit in one chunk (a batch of tokens into a large vocabulary), only those rows are
  made (one kernel call per run of consecutive rows, at its own offset); otherwise rows of the
  table in chunks, only the chunks some index falls in, rows gathered into the output.
- ``F.conv1d/2d/3d``: output channels in chunks (whole groups for grouped convolutions), each
  chunk's output channels copied into the output.

Everything else that reads a tracked parameter -- a bias or a norm's weight in an elementwise op,
``F.layer_norm``, ``nn.MultiheadAttention``'s fused in-projection, transformers' ``Conv1D``
(``torch.addmm``), ``F.embedding`` with ``max_norm``, ``p.t()``, ``p.data`` -- **falls back**: that
parameter is made perturbed as a whole for the duration of that one call (extra memory: its size).
:attr:`ChunkedPerturbation.fallback_max_bytes` records the largest such copy, so a caller can check
the bound. Reads anywhere are intercepted, including a parameter used outside its module's forward
(tied weights through ``F.linear(x, embed.weight)``); only code that reads parameter memory without
going through torch functions (a C extension handed ``p.data_ptr()``) would see the stored value.

Metadata reads (``p.shape``, ``p.dtype``, ``p.device``, ``p.size()``, ...) pass through. The
perturbation applies to torch calls made on the thread that entered :meth:`perturb`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import zo_kernels

__all__ = ["ChunkedPerturbation", "DEFAULT_CHUNK_BYTES", "exact_values"]

#: Default bound of one weight chunk (and of one output chunk) of the chunked ops, in bytes.
DEFAULT_CHUNK_BYTES = 4 << 20

# Tensor attributes and methods that read metadata only (never the values).
_META_ATTRS = {"shape", "dtype", "device", "is_cuda", "is_cpu", "is_sparse", "is_quantized",
               "is_meta", "is_mps", "layout", "ndim", "requires_grad", "grad", "grad_fn", "is_leaf",
               "names", "itemsize", "nbytes", "_base", "is_nested", "output_nr", "_version",
               "__class__", "__dict__", "_backward_hooks", "_post_accumulate_grad_hooks"}
_META_METHODS = {"size", "dim", "numel", "nelement", "stride", "is_contiguous", "element_size",
                 "is_floating_point", "is_complex", "is_signed", "get_device", "data_ptr",
                 "storage_offset", "__hash__", "__len__", "ndimension", "is_pinned",
                 "has_names", "is_inference", "requires_grad_", "__repr__", "__format__",
                 "__reduce_ex__", "__deepcopy__", "retain_grad", "register_hook", "dim_order"}


def _meta_only(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "") in _META_ATTRS
    return name in _META_METHODS


class _Mode(TorchFunctionMode):
    def __init__(self, owner: "ChunkedPerturbation"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        o = self.owner
        if not o._touches(args, kwargs) or _meta_only(func):
            return func(*args, **kwargs)
        impl = _CHUNKED.get(func)
        if impl is not None:
            out = impl(o, *args, **kwargs)
            if out is not NotImplemented:
                return out
        else:
            o._note_fallback(func)
        return func(*o._whole(args), **o._whole(kwargs))


class ChunkedPerturbation:
    """Evaluate forwards at ``w + alpha z(seed)`` (per parameter ``alpha``) without writing ``w``.

    Args:
        params: the tracked parameters, in flat-vector order.
        offsets: their global offsets (default ``zo_kernels.offsets(params)``).
        dist, backend: as for ``zo_kernels.apply_seeds_``.
        chunk_bytes: bound of one weight chunk and one output chunk of the chunked ops.

    Use::

        cp = ChunkedPerturbation(list(model.parameters()))
        with cp.perturb(seed, +a):
            lp = loss(model)          # every torch call sees w + a z(seed)
        with cp.perturb(seed, -a):
            lm = loss(model)
    """

    def __init__(self, params: Sequence[torch.Tensor], offsets: Sequence[int] | None = None,
                 dist: str = "rademacher", backend: str | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        params = list(params)
        if not params:
            raise ValueError("ChunkedPerturbation: no parameters to perturb")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"ChunkedPerturbation: chunk_bytes must be an int >= 1, got "
                             f"{chunk_bytes!r}")
        offs = zo_kernels.offsets(params) if offsets is None else [int(o) for o in offsets]
        if len(offs) != len(params):
            raise ValueError(f"ChunkedPerturbation: {len(params)} parameters but {len(offs)} "
                             "offsets")
        for p in params:
            if not p.is_contiguous():
                raise ValueError(f"ChunkedPerturbation: a parameter of shape {tuple(p.shape)} is "
                                 "not contiguous")
        self.params = params
        self.dist = dist
        self.backend = backend
        self.chunk_bytes = int(chunk_bytes)
        self._base = {id(p): o for p, o in zip(params, offs)}
        self._alpha: dict[int, float] = {}
        self._seed: int | None = None
        self._pre: list = []
        #: Largest whole-parameter perturbed copy made by a fallback (bytes); 0 if none.
        self.fallback_max_bytes = 0
        #: Largest chunk made by a chunked op (bytes).
        self.chunk_max_bytes = 0
        #: Names of the torch functions that fell back, with counts.
        self.fallbacks: dict[str, int] = {}

    # -- the perturbed values ------------------------------------------------------------------------
    def _touches(self, args, kwargs) -> bool:
        base = self._base
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                if id(a) in base:
                    return True
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor) and id(b) in base:
                        return True
        return False

    def _make(self, p: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of ``p`` (flat), perturbed: a new contiguous 1-D tensor."""
        flat = p.detach().reshape(-1)
        v = flat[start:stop].clone()
        off = self._base[id(p)] + start
        for seeds, coeffs in self._pre:
            zo_kernels.apply_seeds_(v, seeds, coeffs, 1.0, self.dist, self.backend, off)
        zo_kernels.apply_seeds_(v, [self._seed], [self._alpha[id(p)]], 1.0, self.dist,
                                self.backend, off)
        return v

    def _rows(self, p: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        row = p[0].numel() if p.dim() else 1
        v = self._make(p, r0 * row, r1 * row).view((r1 - r0,) + tuple(p.shape[1:]))
        self.chunk_max_bytes = max(self.chunk_max_bytes, v.numel() * v.element_size())
        return v

    def _gathered_rows(self, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of the 2-D ``p``, perturbed: a new ``(len(rows), d)``
        tensor. Each run of consecutive rows is one contiguous span of the flat noise vector, so it
        is perturbed by one call with its own offset: the same bits as the whole-table path."""
        d = p.shape[1]
        v = p.detach().index_select(0, rows)
        r = rows.tolist()
        base = self._base[id(p)]
        j = 0
        while j < len(r):
            k = j + 1
            while k < len(r) and r[k] == r[k - 1] + 1:
                k += 1
            span = v[j:k].reshape(-1)
            off = base + r[j] * d
            for seeds, coeffs in self._pre:
                zo_kernels.apply_seeds_(span, seeds, coeffs, 1.0, self.dist, self.backend, off)
            zo_kernels.apply_seeds_(span, [self._seed], [self._alpha[id(p)]], 1.0, self.dist,
                                    self.backend, off)
            j = k
        self.chunk_max_bytes = max(self.chunk_max_bytes, v.numel() * v.element_size())
        return v

    def _full(self, p: torch.Tensor) -> torch.Tensor:
        return self._make(p, 0, p.numel()).view(p.shape)

    def _maybe(self, t):
        """``t`` perturbed as a whole if it is tracked (small tensors: biases), else ``t``."""
        if isinstance(t, torch.Tensor) and id(t) in self._base:
            return self._full(t)
        return t

    def _whole(self, tree):
        """The fallback: every tracked parameter in ``tree`` (args or kwargs) perturbed whole."""
        def one(t):
            if isinstance(t, torch.Tensor) and id(t) in self._base:
                self.fallback_max_bytes = max(self.fallback_max_bytes,
                                              t.numel() * t.element_size())
                return self._full(t)
            return t
        if isinstance(tree, dict):
            return {k: self._whole(v) if isinstance(v, (list, tuple)) else one(v)
                    for k, v in tree.items()}
        return type(tree)(self._whole(v) if isinstance(v, (list, tuple)) else one(v)
                          for v in tree) if not isinstance(tree, torch.Tensor) else one(tree)

    def _note_fallback(self, func) -> None:
        name = getattr(func, "__name__", str(func))
        self.fallbacks[name] = self.fallbacks.get(name, 0) + 1

    # -- public API ----------------------------------------------------------------------------------
    @contextmanager
    def perturb(self, seed: int, alpha, pre: Sequence[tuple[Sequence[int], Sequence[float]]] = ()):
        """Within the block, torch calls read ``apply(apply(w, pre...), [seed], [alpha_p])``.

        ``alpha`` is one float for every parameter or a sequence aligned with ``params``; ``pre``
        holds (seeds, coeffs) batches applied first, one ``apply_seeds_`` call each, in order (a
        client's local updates).
        """
        if self._seed is not None:
            raise RuntimeError("ChunkedPerturbation.perturb: already active (not reentrant)")
        if isinstance(alpha, (list, tuple)):
            if len(alpha) != len(self.params):
                raise ValueError(f"ChunkedPerturbation.perturb: {len(alpha)} alphas for "
                                 f"{len(self.params)} parameters")
            self._alpha = {id(p): float(a) for p, a in zip(self.params, alpha)}
        else:
            self._alpha = {id(p): float(alpha) for p in self.params}
        self._seed = zo_kernels.check_seed(seed)
        self._pre = [(list(s), list(c)) for s, c in pre]
        try:
            with torch.no_grad(), _Mode(self):
                yield self
        finally:
            self._seed = None
            self._pre = []


# ------------------------------------------------------------------------------------------------
# chunked implementations: (owner, *args, **kwargs) -> result, or NotImplemented to fall back
# ------------------------------------------------------------------------------------------------
def _linear(o: ChunkedPerturbation, input, weight, bias=None):
    if id(weight) not in o._base or weight.dim() != 2:
        o._note_fallback(F.linear)
        return NotImplemented
    out_f, in_f = weight.shape
    tokens = max(1, input.numel() // max(1, in_f))
    rows = max(1, o.chunk_bytes // (max(in_f, tokens) * weight.element_size()))
    if rows >= out_f:
        return F.linear(input, o._rows(weight, 0, out_f), o._maybe(bias))
    direct = (input.dim() >= 1 and input.dtype == weight.dtype and input.device == weight.device
              and (bias is None or bias.dtype == weight.dtype)
              and not torch.is_autocast_enabled(input.device.type))
    out = None
    if direct:
        # each chunk's GEMM writes its output columns in place (a strided slice with row stride
        # out_f, which BLAS takes as its leading dimension): no chunk output, no copy
        x2 = input.reshape(-1, in_f)
        out = torch.empty(tuple(input.shape[:-1]) + (out_f,), dtype=input.dtype,
                          device=input.device)
        o2 = out.view(-1, out_f)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        b = None if bias is None else (o._make(bias, r0, r1) if id(bias) in o._base
                                       else bias[r0:r1])
        w = o._rows(weight, r0, r1)
        if direct:
            if b is None:
                torch.mm(x2, w.t(), out=o2[:, r0:r1])
            else:
                torch.addmm(b, x2, w.t(), out=o2[:, r0:r1])
            del w
            continue
        y = F.linear(input, w, b)
        if out is None:
            out = torch.empty(y.shape[:-1] + (out_f,), dtype=y.dtype, device=y.device)
        out[..., r0:r1] = y
        del y, w
    return out


def _embedding(o: ChunkedPerturbation, input, weight, padding_idx=None, max_norm=None,
               norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    if id(weight) not in o._base or weight.dim() != 2 or max_norm is not None:
        o._note_fallback(F.embedding)
        return NotImplemented  # max_norm renormalizes rows in place: only on a whole copy
    n, d = weight.shape
    rows = max(1, o.chunk_bytes // (d * weight.element_size()))
    idx = input.reshape(-1)
    if idx.numel() * d * weight.element_size() <= o.chunk_bytes and idx.numel() < n:
        # few indices (a batch of tokens into a large vocabulary): only the rows looked up are made
        uniq, inv = torch.unique(idx, return_inverse=True)
        return o._gathered_rows(weight, uniq).index_select(0, inv).view(tuple(input.shape) + (d,))
    if rows >= n:
        return F.embedding(input, o._rows(weight, 0, n), padding_idx)
    out = torch.empty((idx.numel(), d), dtype=weight.dtype, device=weight.device)
    which = torch.div(idx, rows, rounding_mode="floor")
    for c in torch.unique(which).tolist():
        r0, r1 = c * rows, min(n, (c + 1) * rows)
        sel = (which == c).nonzero().reshape(-1)
        out.index_copy_(0, sel, o._rows(weight, r0, r1).index_select(0, idx[sel] - r0))
    return out.view(tuple(input.shape) + (d,))


def _conv(fn):
    def impl(o: ChunkedPerturbation, input, weight, bias=None, stride=1, padding=0, dilation=1,
             groups=1):
        if id(weight) not in o._base:
            o._note_fallback(fn)
            return NotImplemented
        oc = weight.shape[0]
        per = weight[0].numel() * weight.element_size()
        # a chunk holds whole groups of a grouped convolution, any output channels otherwise
        unit = oc // groups if groups > 1 else 1
        n_units = groups if groups > 1 else oc
        units = max(1, o.chunk_bytes // (per * unit))
        if units >= n_units:
            return fn(input, o._rows(weight, 0, oc), o._maybe(bias), stride, padding, dilation,
                      groups)
        icg = weight.shape[1]  # input channels per group
        out = None
        u0 = 0
        while u0 < n_units:
            u1 = min(n_units, u0 + units)
            c0, c1 = u0 * unit, u1 * unit
            x = input if groups == 1 else input[:, u0 * icg:u1 * icg]
            b = None if bias is None else (o._make(bias, c0, c1) if id(bias) in o._base
                                           else bias[c0:c1])
            y = fn(x, o._rows(weight, c0, c1), b, stride, padding, dilation,
                   u1 - u0 if groups > 1 else 1)
            if out is None:
                out = torch.empty((y.shape[0], oc) + tuple(y.shape[2:]), dtype=y.dtype,
                                  device=y.device)
                # later chunks: bounded by their output as well (N x spatial per channel)
                per_out = max(1, y[:, :1].numel() * y.element_size() * unit)
                units = max(1, min(units, o.chunk_bytes // per_out))
            out[:, c0:c1] = y
            del y
            u0 = u1
        return out
    return impl


_CHUNKED = {F.linear: _linear, F.embedding: _embedding, F.conv1d: _conv(F.conv1d),
            F.conv2d: _conv(F.conv2d), F.conv3d: _conv(F.conv3d)}


def exact_values(perturbed, evaluate, seeds, reduce=None) -> list[float]:
    """The SPSA losses ``L+_0, L-_0, L+_1, ...`` in exact mode (``ZOOptimizer(exact=True)``).

    ``perturbed(seed, sign)`` is a context in which forwards read ``w + sign * eps_c * z(seed)``;
    ``evaluate()`` calls the closure and returns ``(loss, n)``. Without ``reduce`` (one process)
    it stops at the first non-finite loss. With ``reduce(evals, seeds)`` (the data-parallel
    all-reduce) every rank evaluates all 2S and gets the reduced losses, as in the in-place mode.
    """
    evals: list = []
    for seed in seeds:
        for sign in (1.0, -1.0):
            with perturbed(int(seed), sign):
                evals.append(evaluate())
            if reduce is None and not math.isfinite(evals[-1][0]):
                return [v for v, _ in evals]
    if reduce is None:
        return [v for v, _ in evals]
    return reduce(evals, list(seeds))
