"""Public entry points: validation, offsets, backend choice, and the ``torch.library`` op.

Everything is validated before any tensor is touched, so a bad call raises and changes nothing.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence, Union

import torch

from . import _gpu
from . import reference as _ref
from ._backends import backends as _backends_report
from ._backends import cpu_extension, cuda_extension, triton_interpreted, triton_module

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DISTS = ("rademacher", "gaussian")
BACKENDS = ("reference", "cpu", "triton", "cuda")
BLOCK = _ref.BLOCK
#: Seeds per subset-sum table in the Rademacher accumulation order (DESIGN section 4): ``apply_seeds_``
#: sums the seeds in groups of ``SUM_GROUP`` consecutive seeds, each group through one
#: ``2**SUM_GROUP``-entry table of fp32 subset sums (see its docstring).
SUM_GROUP = _ref.SUM_GROUP
_U64 = 1 << 64
_I63 = (1 << 63) - 1

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _as_list(tensors: TensorList, fn: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{fn}: tensors must be a Tensor or a list/tuple of Tensors, "
                        f"got {type(tensors).__name__}")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: tensors[{i}] is a {type(t).__name__}, not a torch.Tensor")
    return out


def _check_tensors(ts: list[torch.Tensor], fn: str) -> None:
    for i, t in enumerate(ts):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{fn}: tensors[{i}] has dtype {t.dtype}; supported dtypes are "
                            "torch.float32, torch.bfloat16 and torch.float16")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: tensors[{i}] (shape {tuple(t.shape)}, strides {t.stride()}) is "
                             "not contiguous; the noise stream indexes elements in row-major "
                             "order of contiguous memory. Pass t.contiguous() and copy back, or a "
                             "contiguous parameter")
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"{fn}: tensors[{i}] is an inference tensor; updating it in place "
                               "is only allowed inside torch.inference_mode() (as for any torch op)")
    devs = {t.device for t in ts}
    if len(devs) > 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted(map(str, devs))}")
    for i, t in enumerate(ts):  # all on one device here: meta tensors have no values to update
        if t.device.type == "meta":
            raise ValueError(f"{fn}: tensors[{i}] is a meta tensor (a shape without values); "
                             "materialize it first (e.g. module.to_empty(device=...))")
    # Overlapping memory would make the in-place update depend on the processing order.
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
                   for i, t in enumerate(ts) if t.numel() > 0)
    for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{fn}: tensors[{i0}] and tensors[{i1}] share memory; each element "
                             "must appear once in the flat vector")


def check_seed(s, where: str = "seed") -> int:
    """``s`` as a Python int if it is an unsigned 64-bit seed (an integer in ``[0, 2**64)``).

    The one seed check of the project: raises TypeError for a non-integer (bool included) and
    ValueError for an integer out of range, each naming ``where``.
    """
    if isinstance(s, bool) or not isinstance(s, numbers.Integral):
        raise TypeError(f"{where} must be an int in [0, 2**64), got {type(s).__name__} {s!r}")
    s = int(s)
    if not 0 <= s < _U64:
        raise ValueError(f"{where} = {s} is out of range; seeds are unsigned 64-bit: [0, 2**64)")
    return s


def _seeds_tensor(seeds, fn: str) -> torch.Tensor:
    """int64 CPU tensor holding the seeds' 64-bit patterns."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype != torch.int64:
            raise TypeError(f"{fn}: a seeds tensor must have dtype torch.int64 (the bit patterns "
                            f"of unsigned 64-bit seeds), got {seeds.dtype}")
        if seeds.dim() > 1:
            raise ValueError(f"{fn}: seeds must be 1-D, got shape {tuple(seeds.shape)}")
        if seeds.device.type == "meta":
            raise ValueError(f"{fn}: seeds is a meta tensor (no values); pass real seeds")
        if seeds.device.type == "cuda":  # read on the device by the GPU backends: no sync here
            return seeds.reshape(-1).contiguous()
        return seeds.reshape(-1).to("cpu").contiguous()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"{fn}: seeds must be a sequence of ints or an int64 tensor, "
                        f"got {type(seeds).__name__}")
    vals = [check_seed(s, f"{fn}: seeds[{i}]") for i, s in enumerate(seeds)]
    return torch.tensor([v - _U64 if v > _I63 else v for v in vals], dtype=torch.int64)


def _coeffs_tensor(coeffs, fn: str) -> torch.Tensor:
    if isinstance(coeffs, torch.Tensor):
        if not coeffs.is_floating_point():
            raise TypeError(f"{fn}: a coeffs tensor must be floating point, got {coeffs.dtype}")
        if coeffs.dim() > 1:
            raise ValueError(f"{fn}: coeffs must be 1-D, got shape {tuple(coeffs.shape)}")
        if coeffs.device.type == "meta":
            raise ValueError(f"{fn}: coeffs is a meta tensor (no values); pass real coefficients")
        if coeffs.device.type == "cuda":
            # Read on the device by the GPU backends; checking finiteness here would synchronize
            # the stream, so device coefficients are not checked (a non-finite one gives
            # non-finite results, as in any torch op). See docs/DESIGN.md, "The GPU path".
            return coeffs.detach().reshape(-1).to(torch.float32).contiguous()
        c = coeffs.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    else:
        if isinstance(coeffs, (str, bytes)) or not isinstance(coeffs, Iterable):
            raise TypeError(f"{fn}: coeffs must be a sequence of floats or a float32 tensor, "
                            f"got {type(coeffs).__name__}")
        vals = list(coeffs)
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{fn}: coeffs[{i}] must be a real number, got "
                                f"{type(v).__name__} {v!r}")
        c = torch.tensor([float(v) for v in vals], dtype=torch.float32)
    bad = (~torch.isfinite(c)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{fn}: coeffs[{i}] = {float(c[i])} is not finite (after rounding to "
                         "float32); every coefficient must be a finite float32")
    return c


def normalize_backend(backend, fn: str = "apply_seeds_") -> str | None:
    """``None`` for the default backend (``None`` or ``"auto"``), else the checked backend name."""
    if backend is None or backend == "auto":
        return None
    _check_choice(backend, BACKENDS, "backend", fn)
    return backend


def _check_choice(value, allowed, name: str, fn: str):
    if value not in allowed:
        raise ValueError(f"{fn}: unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def offsets(tensors: TensorList, start: int = 0) -> list[int]:
    """Global index of element 0 of each tensor in the flat vector (DESIGN section 3).

    ``offsets(ts)[k] = start + sum_{j<k} ceil(ts[j].numel() / 128) * 128``: every tensor starts on a
    128-element block, so one Philox call never spans two tensors.
    """
    ts = _as_list(tensors, "offsets")
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
        raise ValueError(f"offsets: start must be an int >= 0, got {start!r}")
    out, pos = [], int(start)
    for t in ts:
        out.append(pos)
        pos += -(-t.numel() // BLOCK) * BLOCK
    return out


def _total_span(ts: list[torch.Tensor]) -> int:
    return sum(-(-t.numel() // BLOCK) * BLOCK for t in ts)


def _default_backend(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu" if cpu_extension() is not None else "reference"
    if device.type == "cuda":
        return "triton" if triton_module()[0] is not None else "reference"
    return "reference"


def _check_backend_usable(backend: str, device: torch.device, fn: str) -> None:
    if backend == "reference":
        return
    if backend == "cpu":
        if cpu_extension() is None:
            raise RuntimeError(f"{fn}: backend 'cpu' is not built: {_backends_report()['cpu']['why']}")
        if device.type != "cpu":
            raise ValueError(f"{fn}: backend 'cpu' needs CPU tensors, got device {device}")
    elif backend == "triton":
        mod, why = triton_module()
        if mod is None:
            raise RuntimeError(f"{fn}: backend 'triton' is unavailable: {why}")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(f"{fn}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                             "set before triton is imported, for CPU tensors)")
    elif backend == "cuda":
        mod, why = cuda_extension()
        if mod is None:
            raise RuntimeError(f"{fn}: backend 'cuda' is unavailable: {why}")
        if device.type != "cuda":
            raise ValueError(f"{fn}: backend 'cuda' needs CUDA tensors, got device {device}")


# --------------------------------------------------------------------------------------------
# backend implementations (same signature); ``seeds`` int64 CPU, ``coeffs`` float32 CPU
# --------------------------------------------------------------------------------------------
def _run_reference(ts, seeds, coeffs, bases, decay, dist):
    _ref.apply_seeds_reference(ts, bases, [int(s) % _U64 for s in seeds.tolist()], coeffs.tolist(),
                               decay, dist)


def _run_cpu(ts, seeds, coeffs, bases, decay, dist):
    cpu_extension().apply_seeds(ts, seeds.cpu(), coeffs.cpu(), list(bases), float(decay),
                                DISTS.index(dist))


def _run_triton(ts, seeds, coeffs, bases, decay, dist):
    # One launch, no synchronization: the host side lives in _gpu (docs/DESIGN.md, "The GPU path").
    _gpu.run_triton(ts, seeds, coeffs, bases, float(decay), dist)


def _run_cuda(ts, seeds, coeffs, bases, decay, dist):
    _gpu.run_cuda(cuda_extension()[0], ts, seeds, coeffs, bases, float(decay), dist)


_IMPLS = {"reference": _run_reference, "cpu": _run_cpu, "triton": _run_triton, "cuda": _run_cuda}


# --------------------------------------------------------------------------------------------
# torch.library op: zo_kernels::apply_seeds_ (in place on a list of tensors)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("zo_kernels::apply_seeds_", mutates_args=("tensors",))
def _apply_seeds_op(tensors: list[torch.Tensor], seeds: torch.Tensor, coeffs: torch.Tensor,
                    bases: list[int], decay: float, dist: str) -> None:
    """Default kernel (any device): the reference path."""
    _run_reference(tensors, seeds, coeffs, bases, decay, dist)


@_apply_seeds_op.register_kernel("cpu")
def _apply_seeds_cpu(tensors, seeds, coeffs, bases, decay, dist):
    _IMPLS[_default_backend(torch.device("cpu"))](tensors, seeds, coeffs, bases, decay, dist)


@_apply_seeds_op.register_kernel("cuda")
def _apply_seeds_cuda(tensors, seeds, coeffs, bases, decay, dist):
    # seeds/coeffs stay where they are: the GPU backends read CUDA ones on the device (no sync).
    _IMPLS[_default_backend(tensors[0].device)](tensors, seeds, coeffs, bases, decay, dist)


@_apply_seeds_op.register_fake
def _apply_seeds_fake(tensors, seeds, coeffs, bases, decay, dist):
    torch._check(seeds.dtype == torch.int64, lambda: "seeds must be int64")
    torch._check(coeffs.dtype == torch.float32, lambda: "coeffs must be float32")
    torch._check(seeds.numel() == coeffs.numel(), lambda: "len(seeds) != len(coeffs)")
    torch._check(len(bases) == len(tensors), lambda: "one base per tensor")
    torch._check(dist in DISTS, lambda: f"unknown dist {dist}")
    for t in tensors:
        torch._check(t.dtype in SUPPORTED_DTYPES, lambda: f"unsupported dtype {t.dtype}")
    return None


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def apply_seeds_(tensors: TensorList, seeds, coeffs, decay: float = 1.0, dist: str = "rademacher",
                 backend: str | None = None, offset: int = 0) -> None:
    """Apply K seeded noise directions to a list of tensors in place, in one pass over memory.

    For every element with global index ``i`` (see :func:`offsets`; the list is one flat vector
    whose first element has index ``offset``), with ``z_k`` noise stream v1 for ``seeds[k]`` and
    ``c_k`` the coefficients rounded to float32; all arithmetic in fp32, round to nearest even, in
    exactly this order (no reassociation, no fused multiply-add):

    Rademacher (``dist="rademacher"``), the grouped order with :data:`SUM_GROUP` = 4 seeds per
    group. Group ``g = 0 .. ceil(K/4)-1`` holds seeds ``4g .. min(4g+4, K)-1`` (``n_g`` of them;
    the last group may be short). Its subset-sum table, for ``m = 0 .. 15``::

        t = (bit 0 of m ? c_4g : -c_4g)
        for j in 1 .. n_g-1:  t = t + (bit j of m ? c_{4g+j} : -c_{4g+j})
        T_g[m] = t

    (computed once per call on the host; entries ``m >= 2**n_g`` of a short group equal
    ``T_g[m & (2**n_g - 1)]`` and are never used). Then, per element::

        idx_g(i) = sum_{j < n_g} [z_{4g+j}(i) == +1] << j
        acc = 0.0f;  for g in 0 .. ceil(K/4)-1:  acc = acc + T_g[idx_g(i)]
        p   = to_dtype(float(p) * decay + acc)                         # decay == 1 skips the multiply

    For K <= 5 this is the same number as the plain sum ``acc = acc + (z_k > 0 ? c_k : -c_k)`` in
    seed order (so :func:`perturb_`, K = 1, adds exactly ``+-alpha``); for larger K it is a
    different rounding of the same sum. Gaussian (``dist="gaussian"``), seed order::

        acc = 0.0f;  for k in 0..K-1:  acc = acc + c_k * z_k(i)        # product rounded to fp32
        p   = to_dtype(float(p) * decay + acc)

    K = 0 gives ``acc = 0``. With Rademacher noise the result is bit-identical on every backend,
    device and thread count (Gaussian: within 1e-6 relative, the transcendental functions differ).

    Args:
        tensors: a Tensor or a list of Tensors, float32 / bfloat16 / float16, contiguous, all on one
            device, not sharing memory. Non-contiguous tensors are rejected (ValueError).
        seeds: K unsigned 64-bit seeds: Python ints in [0, 2**64), or an int64 tensor holding their
            bit patterns (``s - 2**64`` for ``s >= 2**63``).
        coeffs: K finite coefficients: floats, or a float tensor (rounded to float32 once).
        decay: multiplier applied to the old value (``1 - lr * weight_decay`` in an optimizer).
        dist: ``"rademacher"`` (default) or ``"gaussian"``.
        backend: None or ``"auto"`` (CPU tensors: ``"cpu"``; CUDA tensors: ``"triton"``) or one of
            ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
        offset: global index of the first tensor's element 0 (default 0); use ``offsets(all)[k]``
            to update tensor k alone exactly as it would be updated in the whole list.

    Raises TypeError/ValueError naming the problem, before any tensor changes. Empty lists, empty
    tensors and K = 0 with ``decay == 1`` are no-ops.
    """
    fn = "apply_seeds_"
    ts = _as_list(tensors, fn)
    _check_tensors(ts, fn)
    seeds_t = _seeds_tensor(seeds, fn)
    coeffs_t = _coeffs_tensor(coeffs, fn)
    if seeds_t.numel() != coeffs_t.numel():
        raise ValueError(f"{fn}: len(seeds) = {seeds_t.numel()} but len(coeffs) = {coeffs_t.numel()}; "
                         "give one coefficient per seed")
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not math.isfinite(decay):
        raise ValueError(f"{fn}: decay must be a finite real number, got {decay!r}")
    if not math.isfinite(float(torch.tensor(float(decay), dtype=torch.float32))):
        raise ValueError(f"{fn}: decay = {decay!r} overflows float32")
    _check_choice(dist, DISTS, "dist", fn)
    backend = normalize_backend(backend, fn)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"{fn}: offset must be an int >= 0, got {offset!r}")
    ts_nonempty = [t for t in ts if t.numel() > 0]
    if not ts_nonempty or (seeds_t.numel() == 0 and float(decay) == 1.0):
        return None
    if int(offset) + _total_span(ts) > _I63:
        raise ValueError(f"{fn}: offset + size exceeds 2**63 - 1 global indices")
    device = ts[0].device
    if backend is not None:
        _check_backend_usable(backend, device, fn)
    bases = offsets(ts, int(offset))
    pairs = [(t, b) for t, b in zip(ts, bases) if t.numel() > 0]
    ts_run, bases_run = [p[0] for p in pairs], [p[1] for p in pairs]
    with torch.no_grad():
        # Straight to the backend: going through torch.ops costs a one-time import of torch._dynamo
        # (2-4 s) and a few microseconds per call; the registered op is there for torch.compile and
        # opcheck, and dispatches to the same functions.
        _IMPLS[backend or _default_backend(device)](ts_run, seeds_t, coeffs_t, bases_run,
                                                    float(decay), dist)
    return None


def perturb_(tensors: TensorList, seed, alpha: float, dist: str = "rademacher",
             backend: str | None = None, offset: int = 0) -> None:
    """``p += alpha * z(seed)`` in place: :func:`apply_seeds_` with one seed (same bits)."""
    check_seed(seed, "perturb_: seed")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"perturb_: alpha must be a real number, got {type(alpha).__name__}")
    apply_seeds_(tensors, [seed], [alpha], 1.0, dist, backend, offset)


def noise(seed, n: int, offset: int = 0, dist: str = "rademacher", dtype: torch.dtype = torch.float32,
          device="cpu", backend: str | None = None) -> torch.Tensor:
    """The stream materialized: ``z(seed)[offset : offset + n]`` as a 1-D tensor (tests, debugging).

    Computed as ``apply_seeds_(zeros(n), [seed], [1.0], offset=offset)`` in float32 (so it is the
    very value every backend adds), then cast to ``dtype``.
    """
    check_seed(seed, "noise: seed")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"noise: n must be an int >= 0, got {n!r}")
    _check_choice(dist, DISTS, "dist", "noise")
    out = torch.zeros(int(n), dtype=torch.float32, device=device)
    apply_seeds_([out], [seed], [1.0], 1.0, dist, backend, offset)
    return out.to(dtype)


def backends() -> dict:
    """Which backends are built and usable here; see :func:`zo_kernels._backends.backends`."""
    return _backends_report()
