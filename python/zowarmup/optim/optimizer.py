"""ZOOptimizer: a drop-in ``torch.optim`` optimizer that trains with forward passes only.

The step is SPSA with seed-regenerated noise (DESIGN section 5), fused into
:func:`zo_kernels.apply_seeds_` so that no noise tensor, gradient or weight copy ever exists: a step
needs the memory of inference. See :class:`ZOOptimizer` for the algorithm and its guarantees, and
:func:`freeze_running_stats` / :func:`running_stats_once` for models with BatchNorm.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
import zlib
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as tdist
from torch.nn.modules.batchnorm import _NormBase

import zo_kernels

from . import parallel as _parallel
from .exact_chunked import DEFAULT_CHUNK_BYTES, ChunkedPerturbation, exact_values
from .functional import decay_factor, projected_grad, update_coeffs
from ..seeds import SEED_SCHEME_VERSION, sample_seeds

__all__ = ["ZOOptimizer", "ZOEstimate", "freeze_running_stats", "running_stats_once",
           "PRECISION_WARN_FRACTION"]

_U64 = 1 << 64
_FP32_MAX = float(torch.finfo(torch.float32).max)
_BLOCK = 128  # elements per Rademacher block: every tensor starts on a multiple (DESIGN section 3)

#: Share of a group's weights whose ±eps*scale perturbation rounds away (below half an ulp) above
#: which ZOOptimizer warns (once per group, dtype and eps*scale value).
PRECISION_WARN_FRACTION = 0.10
# Weights sampled per tensor (evenly strided) to estimate that share. A full chunked scan took 10 s
# for 75M fp32 weights here (small-op overhead); the strided sample is one small op per tensor.
_CHECK_SAMPLE = 4096


class ZOEstimate(NamedTuple):
    """The result of :meth:`ZOOptimizer.estimate`: everything needed to replay an update from seeds.

    Attributes:
        seeds: the S noise seeds (ints in ``[0, 2**64)``), in sample order.
        projected_grads: S floats ``g_s = (L+_s - L-_s) / (2 * eps)`` (``eps`` of the optimizer's
            defaults; NaN for a sample whose losses were not finite, and for every later sample).
        loss: the mean of the 2S losses evaluated (NaN if one was not finite).
    """
    seeds: list
    projected_grads: list
    loss: float


# ------------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------------
def _real(value, name: str) -> float:
    """``value`` as a Python float; accepts real numbers and 0-dim real tensors."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got a tensor of "
                            f"shape {tuple(value.shape)} and dtype {value.dtype}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_hypers(lr, eps, scale, weight_decay, group: int | None = None) -> None:
    """Raise ValueError (TypeError for non-numbers) naming the first invalid hyperparameter.

    ``group`` is the param-group index for messages (``param_groups[1]['lr']``), None for the
    constructor's arguments.
    """
    def name(n):
        return n if group is None else f"param_groups[{group}]['{n}']"

    lr_f = _real(lr, name("lr"))
    if not (math.isfinite(lr_f) and lr_f >= 0.0):
        raise ValueError(f"Invalid learning rate {name('lr')} = {lr!r}: must be finite and >= 0")
    eps_f = _real(eps, name("eps"))
    if not (math.isfinite(eps_f) and eps_f > 0.0):
        raise ValueError(f"Invalid {name('eps')} = {eps!r}: the finite-difference step must be "
                         "finite and > 0")
    sc_f = _real(scale, name("scale"))
    if not (math.isfinite(sc_f) and sc_f > 0.0):
        raise ValueError(f"Invalid {name('scale')} = {scale!r}: the noise magnitude must be finite "
                         "and > 0")
    wd_f = _real(weight_decay, name("weight_decay"))
    if not (math.isfinite(wd_f) and wd_f >= 0.0):
        raise ValueError(f"Invalid {name('weight_decay')} = {weight_decay!r}: must be finite "
                         "and >= 0")
    if lr_f * wd_f >= 1.0:
        raise ValueError(f"Invalid {name('lr')} * {name('weight_decay')} = {lr_f * wd_f!r}: the "
                         "decay factor 1 - lr * weight_decay must stay > 0")
    if not math.isfinite(float(torch.tensor(2.0 * eps_f * sc_f, dtype=torch.float32))):
        raise ValueError(f"Invalid {name('eps')} * {name('scale')} = {eps_f * sc_f!r}: "
                         "overflows float32")


def _check_seed(seed, name: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed < _U64:
        raise ValueError(f"{name} = {seed} is out of range: seeds are unsigned 64-bit, "
                         "in [0, 2**64)")
    return seed


def _check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) \
            or num_samples < 1:
        raise ValueError(f"Invalid num_samples = {num_samples!r}: must be an int >= 1")
    return int(num_samples)


def _check_dist(dist) -> str:
    if dist not in zo_kernels.DISTS:
        raise ValueError(f"Invalid dist = {dist!r}: expected one of "
                         f"{', '.join(map(repr, zo_kernels.DISTS))}")
    return dist


def _check_backend(backend):
    if backend == "auto":
        return None
    if backend is not None and backend not in zo_kernels.BACKENDS:
        raise ValueError(f"Invalid backend = {backend!r}: expected None (automatic) or one of "
                         f"{', '.join(map(repr, zo_kernels.BACKENDS))}")
    return backend


def _check_max_skips(max_skips):
    if max_skips is None:
        return None
    if isinstance(max_skips, bool) or not isinstance(max_skips, numbers.Integral) or max_skips < 1:
        raise ValueError(f"Invalid max_skips = {max_skips!r}: must be None or an int >= 1")
    return int(max_skips)


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


def _check_process_group(group):
    """``group`` if it is a usable torch.distributed process group this process belongs to."""
    if group is None:
        return None
    if not tdist.is_available():
        raise RuntimeError("ZOOptimizer: process_group was given, but this torch build has no "
                           "torch.distributed")
    if not tdist.is_initialized():
        raise RuntimeError("ZOOptimizer: process_group was given, but torch.distributed is not "
                           "initialized; call torch.distributed.init_process_group(...) first, "
                           "then pass torch.distributed.group.WORLD or a group from "
                           "torch.distributed.new_group(...)")
    if not isinstance(group, tdist.ProcessGroup):
        raise TypeError(f"ZOOptimizer: process_group must be a torch.distributed.ProcessGroup "
                        f"(e.g. torch.distributed.group.WORLD) or None, got "
                        f"{type(group).__name__}")
    if tdist.get_rank(group) < 0:
        raise ValueError(f"ZOOptimizer: this process (global rank {tdist.get_rank()}) is not a "
                         "member of process_group")
    return group


def _seeds_fingerprint(seeds: Sequence[int]) -> int:
    """16-bit hash of a seed list, to check that every rank evaluates the same directions."""
    return zlib.crc32(b"".join(int(s).to_bytes(8, "little") for s in seeds)) & 0xFFFF


def _span(t: torch.Tensor) -> int:
    """Elements tensor ``t`` occupies in the flat noise vector (rounded up to a block)."""
    return -(-t.numel() // _BLOCK) * _BLOCK


def _vanish_threshold(d: float, dtype: torch.dtype) -> float:
    """Smallest magnitude from which adding ``±d`` to a ``dtype`` value rounds back to the value.

    For ``|p|`` in ``[2**e, 2**(e+1))`` the ulp is ``2**(e - m)`` (``m`` mantissa bits), and
    ``p ± d`` rounds to ``p`` when ``d < ulp / 2``; that holds for every ``e >= floor(log2 d) + m + 2``
    (except the step toward zero from an exact power of two, where the spacing below is halved).
    """
    m = round(-math.log2(torch.finfo(dtype).eps))
    return math.ldexp(1.0, math.floor(math.log2(d)) + m + 2)


def _base_method(name: str):
    """``torch.optim.Optimizer.<name>`` without its lazy ``torch._dynamo`` import, when possible.

    torch wraps ``add_param_group``, ``state_dict``, ``load_state_dict`` and ``zero_grad`` in
    ``torch._disable_dynamo``, whose first call imports ``torch._dynamo``: +150 MiB of RSS measured
    here (637 -> 791 MiB), more than the whole model of a small client. While ``torch._dynamo`` is
    not imported nothing can be compiling, so the undecorated function (``__wrapped__``) is
    equivalent; once it is imported the decorated one is used.
    """
    fn = getattr(torch.optim.Optimizer, name)
    if "torch._dynamo" in sys.modules:
        return fn
    return getattr(fn, "__wrapped__", fn)


# ------------------------------------------------------------------------------------------------
# the optimizer
# ------------------------------------------------------------------------------------------------
class ZOOptimizer(torch.optim.Optimizer):
    r"""Zeroth-order SGD (SPSA with Rademacher noise) at inference memory, as a torch optimizer.

    The only change from a ``torch.optim.SGD`` loop is the closure: it runs the forward pass and
    returns the loss, without ``backward()``::

        opt = ZOOptimizer(model.parameters(), lr=1e-3, eps=1e-3, num_samples=1)
        for x, y in loader:
            loss = opt.step(lambda: loss_fn(model(x), y))

    **Algorithm** (DESIGN section 5). The parameters, in ``param_groups`` order then parameter
    order, form one flat vector (each tensor starts on a 128-element block,
    :func:`zo_kernels.offsets`). Step ``t`` draws S directions ``z_s`` (Rademacher ±1, or Gaussian)
    from the seeds ``derive_seed(seed, t, s)`` (:func:`zowarmup.seeds.derive_seed`); with
    ``c = scale`` and per-group ``eps``, ``lr``, ``wd``::

        for s in 0..S-1:
            w += eps*c*z_{s-1} + eps*c*z_s      # restore the previous sample, perturb (one pass)
            L+ = closure()
            w -= 2*eps*c*z_s;  L- = closure()
            g_s = (L+ - L-) / (2*eps)
        w = (1 - lr*wd) * w + (1 - lr*wd)*eps*c*z_{S-1} - sum_s lr*c*g_s/S * z_s    # one pass

    That is 2S forward passes and 2S+1 passes over the weights, each one
    :func:`zo_kernels.apply_seeds_` call that regenerates the noise from the seeds: no noise
    tensor, no gradient and no weight copy is ever allocated. The restore coefficient in the last
    pass is multiplied by the decay ``1 - lr*wd`` so that weight decay acts on the restored weights
    (DESIGN's sketch adds ``+eps*c``; the two differ by ``lr*wd*eps*c*z``). In expectation the update
    is ``-lr * c**2 * grad L`` (``E[z z^T] = I``), so the effective SGD learning rate is
    ``lr * scale**2``. ``step`` returns the mean of the 2S losses (losses at perturbed weights).

    **Param groups** may set their own ``lr``, ``eps``, ``scale`` and ``weight_decay``. The noise is
    still one flat vector over all groups; group ``k`` is perturbed by ``eps_k*scale_k*z``, and
    its update coefficient is ``-lr_k*scale_k*g_s*(eps/eps_k)/S`` with ``g_s`` the projected
    gradient relative to the optimizer's default ``eps`` (so with one ``eps`` everything reduces to
    the formulas above). ``num_samples``, ``dist``, ``seed`` and ``backend`` are optimizer-wide.
    Every parameter given is trained, whatever its ``requires_grad`` (ZO does not use autograd);
    leave out the parameters to freeze.

    **Exactness.** With Rademacher noise every backend gives bit-identical weights. Restoring by
    adding back is not bit-exact in floating point: after ``+eps*c`` / ``-2*eps*c`` / ``+eps*c``
    a share of the weights ends an ulp-scale step away from where it started (``estimate`` and a
    skipped step leave the weights "where they were, up to this rounding"). A run resumed from
    ``state_dict()`` continues bit-identically, because the seeds depend only on ``(seed, step)``.

    **Non-finite losses.** If a loss is NaN or inf, the step is skipped: the current perturbation
    is undone (weights back to the pre-step state, up to restore rounding), no update is made, the
    step counter still advances (the next step uses fresh directions), ``skipped_steps`` and
    ``consecutive_skips`` in :attr:`zo_state` increment and a RuntimeWarning is raised once per
    optimizer. With ``max_skips=n``, a RuntimeError is raised when n steps in a row were skipped.
    A closure that raises: the perturbation is undone first, then the exception propagates.

    **Low precision.** bfloat16 and float16 parameters are supported (the kernels compute in fp32
    and round once per pass). A perturbation smaller than half an ulp of a weight rounds away:
    in bfloat16 (8 significant bits) ``eps*scale = 7.5e-4`` vanishes for every ``|w| >= 0.25``; those
    weights then see no perturbation, contribute nothing to ``L+ - L-`` and are moved only by the
    update (which may also round away). The first step with a given ``(group, dtype, eps*scale)``
    estimates the share of such weights (from an evenly strided sample of up to 4096 weights per
    tensor) and warns when it exceeds :data:`PRECISION_WARN_FRACTION`. Use a larger ``eps`` (for example 1e-2)
    or float32 master weights in that case.

    **BatchNorm.** In ``train()`` mode every forward in the closure updates the running statistics
    of BatchNorm layers, so one step makes 2S momentum updates (with statistics of perturbed
    weights, an O(eps) difference) and ``num_batches_tracked`` grows by 2S. Use
    :func:`running_stats_once` to let only the first forward of each step update them, or
    :func:`freeze_running_stats` to leave them unchanged.

    **Randomness in the forward.** ``L+ - L-`` must differ only by the perturbation: the closure
    has to evaluate the same batch with the same randomness every call. Dropout in ``train()``
    mode draws new masks per call, which adds noise of order 1 to a difference of order eps;
    switch dropout off for ZO training or re-seed torch's generator at the top of the closure.

    **Data parallel (torch.distributed).** With ``process_group=`` a group of an initialized
    ``torch.distributed`` (e.g. ``torch.distributed.group.WORLD``), every rank holds the whole model
    and evaluates its own shard of the batch in the closure; the optimizer adds up the ranks'
    losses and nothing else::

        dist.init_process_group("gloo")          # or "nccl"; before building the optimizer
        opt = ZOOptimizer(model.parameters(), lr=1e-3, process_group=dist.group.WORLD)
        for x, y in loader:                      # x, y: this rank's shard of the global batch
            opt.step(lambda: (loss_fn(model(x), y), len(x)))

    Per step the 2S local losses go through one ``all_reduce`` (sum) of ``2S + 4`` float64 scalars
    (:meth:`estimate` likewise, for its seeds): the loss of evaluation ``i`` is
    ``sum_r n_r * L_r,i / sum_r n_r``. A closure that returns ``(loss, n)``, ``n`` the number of
    samples its mean loss covers, makes this the loss of the concatenated batch for shards of any
    size (a rank with ``n = 0`` adds exactly nothing); a closure that returns the plain loss
    counts ``n = 1`` per rank, the plain mean over ranks, which is the batch loss only when the
    shards are equal-sized. All ranks must return the same form. The four extra scalars carry the
    ``n`` sum, that form, and a fingerprint of the seeds: ranks that would use different seeds
    (other step counters or base seeds) raise RuntimeError on every rank instead of drifting apart.
    Every rank computes the same projected gradients from the reduced losses and applies the same
    seeds, so the weights stay bit-identical across ranks without sending any weight, provided
    the ranks start from identical weights (same initialization seed, or broadcast once before
    training), use the same kernel backend and the same optimizer arguments and state. A
    non-finite loss on any rank skips the step on all of them (every rank still evaluates all 2S
    losses, so that all make the same weight passes). An error raised on one rank only (the
    closure raises or returns something invalid) leaves the others waiting in the all-reduce until
    the group's timeout, as with ``DistributedDataParallel``. The loss buffer is on the CPU for gloo and mpi groups, on the
    parameters' device otherwise (nccl). The process group is not pickled nor part of
    :meth:`state_dict` (a deep copy or unpickled optimizer is single-process): pass it again when
    rebuilding. Without a process group a closure may return ``(loss, n)`` as well; ``n`` is
    validated and ignored, so one closure serves both modes.

    **Devices and backends.** All parameters must be on one device (else ValueError). ``backend=None``
    uses the C++ kernel for CPU tensors and Triton for CUDA tensors, falling back to the pure-torch
    reference when the compiled one is missing (:func:`zo_kernels.backends`).

    Args:
        params: iterable of parameters or of param-group dicts (float32, bfloat16 or float16,
            contiguous, one device).
        lr: learning rate, ``>= 0``. Works with ``torch.optim.lr_scheduler`` schedulers.
        eps: finite-difference step, ``> 0`` (1e-3 as in MeZO).
        num_samples: S, directions per step, ``>= 1``.
        dist: ``"rademacher"`` (default) or ``"gaussian"``.
        scale: noise magnitude ``c``, ``> 0`` (0.75: the paper's value for one local step).
        weight_decay: decoupled L2 decay, ``>= 0``, applied as ``w *= 1 - lr*weight_decay``.
        seed: base seed, an int in ``[0, 2**64)``.
        backend: ``None`` (automatic) or one of ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
        max_skips: ``None`` or an int ``>= 1``: raise after this many consecutive skipped steps.
        process_group: ``None`` (one process, the default) or a ``torch.distributed``
            ``ProcessGroup`` this process belongs to: data-parallel steps, see above. Keyword-only.
        exact: keyword-only, default False. True: the perturbed forwards read
            ``w +- eps*scale*z`` made on the fly in chunks (:mod:`.exact_chunked`); the stored
            weights change only by the update (no restore rounding: bf16/fp16 weights do not
            drift, ranks and restarts stay bit-identical).
        exact_chunk_bytes: keyword-only; the bound of one weight chunk and one output chunk in
            exact mode (default 4 MiB).
        parallel: keyword-only, ``"data"`` (default: the ranks of ``process_group`` hold shards of
            the batch) or ``"samples"`` (they evaluate the same batch and split the S directions:
            one all_gather of 2 scalars per direction; :mod:`.parallel`).
        data_group: keyword-only, with ``parallel="samples"``: the ranks that evaluate the same
            directions on other shards of the batch (losses all-reduced over it first).

    Raises:
        ValueError: naming the argument, for lr < 0, eps <= 0, num_samples < 1, scale <= 0,
            weight_decay < 0, an unknown dist or backend, parameters on several devices or
            non-contiguous parameters. TypeError for unsupported parameter dtypes.
        RuntimeError: ``process_group`` given while ``torch.distributed`` is not initialized
            (or not available); TypeError if it is not a ``ProcessGroup``; ValueError if this
            process is not one of its members.
    """

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-3, num_samples: int = 1,
                 dist: str = "rademacher", scale: float = 0.75, weight_decay: float = 0.0,
                 seed: int = 0, backend: str | None = None, *, max_skips: int | None = None,
                 process_group=None, exact: bool = False,
                 exact_chunk_bytes: int = DEFAULT_CHUNK_BYTES, parallel: str = "data",
                 data_group=None):
        _check_hypers(lr, eps, scale, weight_decay)
        if not isinstance(exact, bool):
            raise ValueError(f"Invalid exact = {exact!r}: must be True or False")
        if isinstance(exact_chunk_bytes, bool) or not isinstance(exact_chunk_bytes, int) \
                or exact_chunk_bytes < 1:
            raise ValueError(f"Invalid exact_chunk_bytes = {exact_chunk_bytes!r}: must be an int "
                             ">= 1")
        #: Exact mode: perturbed forwards read w + eps*c*z made on the fly (optim/exact_chunked.py);
        #: the stored weights change only by the update.
        self.exact = exact
        self.exact_chunk_bytes = exact_chunk_bytes
        #: "data" (ranks hold shards of the batch) or "samples" (ranks share the S directions).
        self.parallel = _parallel.check_parallel(parallel, process_group, data_group)
        #: With parallel="samples": the ranks holding the other shards for the same directions.
        self.data_group = _check_process_group(data_group)
        self.num_samples = _check_num_samples(num_samples)
        self.dist = _check_dist(dist)
        self.backend = _check_backend(backend)
        self.max_skips = _check_max_skips(max_skips)
        #: The torch.distributed process group whose ranks share each step (None: one process).
        #: Not saved by pickling or ``state_dict``.
        self.process_group = _check_process_group(process_group)
        #: Integer state, saved by :meth:`state_dict` as Python ints: ``step`` (steps taken,
        #: skipped ones included), ``seed``, ``skipped_steps``, ``consecutive_skips``.
        self.zo_state = {"step": 0, "seed": _check_seed(seed, "seed"), "skipped_steps": 0,
                         "consecutive_skips": 0}
        self._warned: set = set()
        defaults = dict(lr=lr, eps=eps, scale=scale, weight_decay=weight_decay)
        super().__init__(params, defaults)
        flags = {bool(p.requires_grad) for p in self._params()}
        if flags == {True, False}:
            n = sum(1 for p in self._params() if not p.requires_grad)
            warnings.warn(f"ZOOptimizer trains every parameter it is given, including {n} with "
                          "requires_grad=False; pass only the parameters to train", UserWarning,
                          stacklevel=2)

    # -- torch.optim.Optimizer plumbing ----------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state.update(num_samples=self.num_samples, dist=self.dist, backend=self.backend,
                     max_skips=self.max_skips, zo_state=self.zo_state, exact=self.exact,
                     exact_chunk_bytes=self.exact_chunk_bytes)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # Defaults for state pickled by older versions (as torch.optim.SGD does).
        self.__dict__.setdefault("num_samples", 1)
        self.__dict__.setdefault("dist", "rademacher")
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("max_skips", None)
        self.__dict__.setdefault("process_group", None)  # never pickled: a process-local handle
        self.__dict__.setdefault("data_group", None)
        self.__dict__.setdefault("exact", False)
        self.__dict__.setdefault("exact_chunk_bytes", DEFAULT_CHUNK_BYTES)
        self.__dict__["parallel"] = "data"  # a copy without its process group is one process
        self.__dict__.setdefault("zo_state", {"step": 0, "seed": 0})
        self.zo_state.setdefault("skipped_steps", 0)
        self.zo_state.setdefault("consecutive_skips", 0)
        self.__dict__.setdefault("_warned", set())
        for group in self.param_groups:
            group.setdefault("eps", self.defaults.get("eps", 1e-3))
            group.setdefault("scale", self.defaults.get("scale", 0.75))
            group.setdefault("weight_decay", self.defaults.get("weight_decay", 0.0))

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (see ``torch.optim.Optimizer.add_param_group``), validated.

        The group's parameters join the end of the flat noise vector, so the noise of the existing
        parameters does not change. Raises ValueError/TypeError (and leaves the optimizer as it
        was) for invalid hyperparameters, unsupported dtypes, non-contiguous parameters or a device
        that differs from the other parameters'.
        """
        n_before = len(self.param_groups)
        _base_method("add_param_group")(self, param_group)
        try:
            group = self.param_groups[-1]
            _check_hypers(group["lr"], group["eps"], group["scale"], group["weight_decay"],
                          n_before)
            self._check_params()
        except (TypeError, ValueError):
            del self.param_groups[n_before:]
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``.grad`` of every parameter (None, or zeros with ``set_to_none=False``).

        ZOOptimizer never reads gradients; this exists so SGD-style loops run unchanged.
        """
        for p in self._params():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict()`` plus a ``"zo"`` entry of Python ints and strings.

        ``"zo"`` holds ``step``, ``seed``, ``skipped_steps``, ``consecutive_skips``, ``num_samples``,
        ``dist``, ``max_skips`` and the versions of the seed scheme and noise stream; loading it
        into an optimizer over the same parameters continues the run bit-identically.
        """
        sd = _base_method("state_dict")(self)
        sd["zo"] = dict(self.zo_state, num_samples=self.num_samples, dist=self.dist,
                        max_skips=self.max_skips, seed_scheme=SEED_SCHEME_VERSION,
                        stream_version=zo_kernels.STREAM_VERSION)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`: param groups (lr, eps, ...) and the ``"zo"`` integer state.

        Raises ValueError, before changing anything, when the ``"zo"`` entry is missing or invalid.
        Warns when the checkpoint was written with another seed scheme or noise-stream version
        (training goes on, but not bit-identically).
        """
        if not isinstance(state_dict, dict) or "zo" not in state_dict:
            raise ValueError("ZOOptimizer.load_state_dict: the state dict has no 'zo' entry; it was "
                             "not written by ZOOptimizer.state_dict()")
        zo = dict(state_dict["zo"])
        try:
            new_state = {"step": int(zo["step"]), "seed": _check_seed(zo["seed"], "zo['seed']"),
                         "skipped_steps": int(zo.get("skipped_steps", 0)),
                         "consecutive_skips": int(zo.get("consecutive_skips", 0))}
            num_samples = _check_num_samples(zo.get("num_samples", self.num_samples))
            dist = _check_dist(zo.get("dist", self.dist))
            max_skips = _check_max_skips(zo.get("max_skips", self.max_skips))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"ZOOptimizer.load_state_dict: invalid 'zo' entry {zo!r} ({exc})") \
                from exc
        if new_state["step"] < 0:
            raise ValueError(f"ZOOptimizer.load_state_dict: zo['step'] = {new_state['step']} < 0")
        for name, ours in (("seed_scheme", SEED_SCHEME_VERSION),
                           ("stream_version", zo_kernels.STREAM_VERSION)):
            if zo.get(name, ours) != ours:
                warnings.warn(f"ZOOptimizer.load_state_dict: checkpoint {name} {zo.get(name)} != "
                              f"{ours}; the run continues with different noise", RuntimeWarning,
                              stacklevel=2)
        rest = {k: v for k, v in state_dict.items() if k != "zo"}
        for i, g in enumerate(rest.get("param_groups", [])):
            _check_hypers(g.get("lr", 0.0), g.get("eps", 1e-3), g.get("scale", 0.75),
                          g.get("weight_decay", 0.0), i)
        _base_method("load_state_dict")(self, rest)
        self.zo_state = new_state
        self.num_samples, self.dist, self.max_skips = num_samples, dist, max_skips

    # -- read-only views of the integer state ----------------------------------------------------
    @property
    def step_count(self) -> int:
        """Steps taken so far (``apply_estimate`` and skipped steps included)."""
        return self.zo_state["step"]

    @property
    def seed(self) -> int:
        """The base seed, in ``[0, 2**64)``."""
        return self.zo_state["seed"]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of a non-finite loss or projected gradient."""
        return self.zo_state["skipped_steps"]

    def sample_seeds(self, step: int | None = None) -> list[int]:
        """The S seeds of step ``step`` (default: the next step): ``derive_seed(seed, step, s)``."""
        t = self.zo_state["step"] if step is None else int(step)
        if t < 0:
            raise ValueError(f"sample_seeds: step must be >= 0, got {step!r}")
        return sample_seeds(self.zo_state["seed"], t, self.num_samples)

    # -- internals -------------------------------------------------------------------------------
    def _params(self) -> Iterable[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _check_params(self) -> None:
        devices = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                where = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
                if p.dtype not in zo_kernels.SUPPORTED_DTYPES:
                    raise TypeError(f"ZOOptimizer: {where} has dtype {p.dtype}; supported: "
                                    "torch.float32, torch.bfloat16, torch.float16")
                if not p.is_contiguous():
                    raise ValueError(f"ZOOptimizer: {where} is not contiguous (strides "
                                     f"{p.stride()}); the noise stream indexes contiguous "
                                     "row-major memory. Use a contiguous memory format")
                devices.setdefault(str(p.device), where)
        if len(devices) > 1:
            raise ValueError("ZOOptimizer: all parameters must be on one device, found "
                             + "; ".join(f"{d} (e.g. {w})" for d, w in devices.items())
                             + ". Use one optimizer per device")

    def _validate(self) -> None:
        """Everything a step relies on; raises before any weight changes."""
        if self.process_group is not None and not tdist.is_initialized():
            raise RuntimeError("ZOOptimizer: torch.distributed is no longer initialized "
                               "(destroy_process_group was called), but this optimizer has a "
                               "process_group")
        _check_num_samples(self.num_samples)
        _check_dist(self.dist)
        _check_backend(self.backend)
        for gi, g in enumerate(self.param_groups):
            _check_hypers(g["lr"], g["eps"], g["scale"], g["weight_decay"], gi)
        self._check_params()

    def _eps_ref(self) -> float:
        return _real(self.defaults["eps"], "eps")

    def _apply_groups(self, seeds: list[int], per_group: Callable[[dict], tuple]) -> None:
        """``apply_seeds_`` with per-group ``(coeffs, decay) = per_group(group)``.

        Consecutive groups with equal coefficients share one call; each call passes the global
        offset of its first tensor, so the noise is that of one flat vector over all groups.
        """
        runs: list[list] = []
        pos = 0
        for group in self.param_groups:
            key = per_group(group)
            ts = [p.detach() for p in group["params"]]
            if runs and runs[-1][0] == key:
                runs[-1][2].extend(ts)
            else:
                runs.append([key, pos, ts])
            pos += sum(_span(t) for t in ts)
        for (coeffs, decay), offset, ts in runs:
            if ts:
                zo_kernels.apply_seeds_(ts, seeds, list(coeffs), decay, self.dist, self.backend,
                                        offset)

    @staticmethod
    def _ec(group: dict) -> float:
        return _real(group["eps"], "eps") * _real(group["scale"], "scale")

    def _undo(self, seed: int, sign: float) -> None:
        """Remove a displacement ``sign * eps*c * z(seed)`` from the weights."""
        self._apply_groups([seed], lambda g: ((-sign * self._ec(g),), 1.0))

    def _eval(self, closure) -> tuple[float, float | None]:
        with torch.no_grad():
            out = closure()
        return _closure_value(out)

    def _reduce_device(self, group=None) -> torch.device:
        """Where the loss buffer of the all-reduce lives: the CPU when the group's backend takes
        CPU tensors (gloo, mpi), else the parameters' device (nccl takes CUDA tensors only)."""
        backend = str(tdist.get_backend(group or self.process_group)).lower()
        if "gloo" in backend or "mpi" in backend:
            return torch.device("cpu")
        return next(iter(self._params()), torch.empty(0)).device

    def _all_reduce_losses(self, evals: list, seeds: list[int], group=None) -> list[float]:
        """The global losses of this step's evaluations: one all-reduce of ``len(evals) + 4``
        float64 scalars over the process group.

        Each rank contributes ``n * loss`` per evaluation (``n = 1`` for a plain loss, so the
        result is the mean over ranks) plus ``n``, a "returned (loss, n)" flag and a fingerprint
        of the seeds with its square; the global loss is ``sum(n_r * L_r) / sum(n_r)``. A rank
        with ``n = 0`` contributes exactly 0 (the mean over an empty shard is NaN). Every check on
        the reduced values raises on every rank alike, so no rank is left waiting.
        """
        counts = [n for _, n in evals]
        if any(n != counts[0] for n in counts):
            raise ValueError(f"ZOOptimizer: the closure returned different sample counts within "
                             f"one step ({', '.join(map(str, counts))}); it must evaluate the "
                             "same shard on every call")
        n = counts[0]
        w = 1.0 if n is None else n
        fp = _seeds_fingerprint(seeds)
        buf = [w * loss if w != 0.0 else 0.0 for loss, _ in evals]
        buf += [w, float(n is not None), float(fp), float(fp * fp)]
        group = group or self.process_group
        t = torch.tensor(buf, dtype=torch.float64, device=self._reduce_device(group))
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=group)
        vals = t.tolist()
        k = len(evals)
        total, counted, fp_sum, fp_sq = vals[k:]
        world = tdist.get_world_size(group)
        # all fingerprints equal <=> world * sum(f^2) == sum(f)^2 (Cauchy-Schwarz); the sums are
        # integers below 2**53, so exact in float64
        if world * (1 << 32) < (1 << 53) and world * int(fp_sq) != int(fp_sum) ** 2:
            raise RuntimeError("ZOOptimizer: the ranks of process_group evaluated different "
                               "noise seeds (their step counters, base seeds or estimate() seeds "
                               "differ); every rank must take the same steps from the same "
                               "state")
        if counted not in (0.0, float(world)):
            raise ValueError(f"ZOOptimizer: {int(counted)} of {world} ranks' closures returned "
                             "(loss, n) and the others a plain loss; all ranks must return the "
                             "same form")
        if not total > 0.0:
            raise ValueError("ZOOptimizer: every rank's closure returned n = 0 samples; there is "
                             "no loss to evaluate")
        return [v / total for v in vals[:k]]

    def _spsa(self, closure, seeds: list[int], keep_last: bool):
        """Evaluate L+ / L- for every seed. Returns (losses, grads, ok).

        ``losses`` ends at the first non-finite loss (then ``ok`` is False), ``grads`` holds one
        projected gradient per complete sample before it. On return the weights are restored,
        except with ``keep_last and ok``: then they are left displaced by ``-eps*c*z(seeds[-1])``
        for the caller's fused final pass. On an exception the displacement is undone before it
        propagates.

        With a process group the 2S losses are the ranks' all-reduced ones. Every rank then
        evaluates all 2S (no early stop at a local non-finite loss), so that all ranks make the
        same weight passes and stay bit-identical.
        """
        if self.exact or self.parallel == "samples":
            return self._spsa_modes(closure, seeds, keep_last)
        eps_ref = self._eps_ref()
        local = self.process_group is None
        evals: list = []  # (loss, n) per closure call, in call order
        disp = None  # (seed, sign): the weights are now w + sign * eps*c * z(seed)
        try:
            for seed in seeds:
                if disp is None:
                    self._apply_groups([seed], lambda g: ((self._ec(g),), 1.0))
                else:  # restore the previous sample and perturb this one in one pass
                    prev = disp[0]
                    self._apply_groups([prev, seed], lambda g: ((self._ec(g), self._ec(g)), 1.0))
                disp = (seed, 1.0)
                evals.append(self._eval(closure))
                if local and not math.isfinite(evals[-1][0]):
                    break
                self._apply_groups([seed], lambda g: ((-2.0 * self._ec(g),), 1.0))
                disp = (seed, -1.0)
                evals.append(self._eval(closure))
                if local and not math.isfinite(evals[-1][0]):
                    break
            values = [v for v, _ in evals] if local else self._all_reduce_losses(evals, seeds)
        except BaseException:
            if disp is not None:
                self._undo(*disp)
            raise
        losses: list[float] = []
        grads: list[float] = []
        ok = True
        for i, v in enumerate(values):
            losses.append(v)
            if not math.isfinite(v):
                ok = False
                break
            if i % 2:
                grads.append(projected_grad(values[i - 1], v, eps_ref))
        if disp is not None and (not ok or not keep_last):
            self._undo(*disp)
        return losses, grads, ok

    def _spsa_modes(self, closure, seeds: list[int], keep_last: bool):
        """:meth:`_spsa` in exact mode and/or with perturbation-parallel ranks (same returns).

        Exact: forwards read ``w +- eps_k c_k z`` made on the fly, nothing is displaced (the
        final pass then has no restore: see :meth:`step`). Samples-parallel in place: every rank
        makes all the passes, the closure runs at its own directions only (optim/parallel.py).
        """
        eps_ref = self._eps_ref()

        def evaluate():
            return self._eval(closure)
        samples = self.parallel == "samples"
        reduce_data = None
        if samples and self.data_group is not None:
            def reduce_data(evals, own_seeds):
                return self._all_reduce_losses(evals, own_seeds, group=self.data_group)
        device = next(iter(self._params()), torch.empty(0)).device
        self._displaced = False
        if self.exact:
            params = list(self._params())
            alphas = [self._ec(g) for g in self.param_groups for _ in g["params"]]
            cp = ChunkedPerturbation(params, zo_kernels.offsets([p.detach() for p in params]),
                                     self.dist, self.backend, self.exact_chunk_bytes)

            def perturbed(seed, sign):
                return cp.perturb(seed, [sign * a for a in alphas])
            if samples:
                values = _parallel.exact_losses(perturbed, evaluate, seeds, self.process_group,
                                                reduce_data, device)
            else:
                values = exact_values(perturbed, evaluate, seeds,
                                      None if self.process_group is None
                                      else self._all_reduce_losses)
            disp = None
        else:
            def displace(ss, mults):
                self._apply_groups(list(ss), lambda g: (tuple(m * self._ec(g) for m in mults),
                                                        1.0))
            values, disp = _parallel.inplace_losses(displace, evaluate, seeds,
                                                    self.process_group, reduce_data, device)
        losses: list[float] = []
        grads: list[float] = []
        ok = True
        for i, v in enumerate(values):
            losses.append(v)
            if not math.isfinite(v):
                ok = False
                break
            if i % 2:
                grads.append(projected_grad(values[i - 1], v, eps_ref))
        if disp is not None and (not ok or not keep_last):
            self._undo(*disp)
        self._displaced = disp is not None and ok and keep_last
        return losses, grads, ok

    def _update_coeffs(self, group: dict, grads: Sequence[float], lr) -> tuple[tuple, float]:
        """Per-group update coefficients ``-lr*c*g_s*(eps/eps_k)/S`` and decay ``1 - lr*wd``."""
        lr_f = _real(group["lr"] if lr is None else lr, "lr")
        c = _real(group["scale"], "scale")
        ratio = self._eps_ref() / _real(group["eps"], "eps")
        coeffs = update_coeffs(grads, lr_f, c, weight=ratio)
        return tuple(coeffs), decay_factor(lr_f, _real(group["weight_decay"], "weight_decay"))

    def _finish(self, ok: bool, what: str) -> None:
        st = self.zo_state
        st["step"] += 1
        if ok:
            st["consecutive_skips"] = 0
            return
        st["skipped_steps"] += 1
        st["consecutive_skips"] += 1
        if "skip" not in self._warned:
            self._warned.add("skip")
            warnings.warn(f"ZOOptimizer: {what} is not finite; step {st['step'] - 1} was skipped "
                          "and the weights restored (warned once; see zo_state['skipped_steps'])",
                          RuntimeWarning, stacklevel=3)
        if self.max_skips is not None and st["consecutive_skips"] >= self.max_skips:
            raise RuntimeError(f"ZOOptimizer: {st['consecutive_skips']} consecutive steps skipped "
                               f"because the {what} was not finite (max_skips={self.max_skips}); "
                               "the weights are at their last good state")

    def _check_precision(self) -> None:
        """Warn when eps*scale is below half an ulp for a sizable share of a group's weights."""
        for gi, group in enumerate(self.param_groups):
            d = self._ec(group)
            by_dtype: dict = {}
            for p in group["params"]:
                by_dtype.setdefault(p.dtype, []).append(p)
            for dtype, ps in by_dtype.items():
                key = ("precision", gi, dtype, d)
                if key in self._warned:
                    continue
                self._warned.add(key)
                thr = _vanish_threshold(d, dtype)
                total = sum(p.numel() for p in ps)
                if total == 0:
                    continue
                lost = 0.0
                with torch.no_grad():
                    for p in ps:
                        flat = p.detach().reshape(-1)
                        if flat.numel() == 0:
                            continue
                        sample = flat[::max(1, flat.numel() // _CHECK_SAMPLE)]  # a view, no copy
                        hit = int(torch.count_nonzero(sample.abs() >= thr))
                        lost += hit / sample.numel() * flat.numel()
                share = lost / total
                if share > PRECISION_WARN_FRACTION:
                    warnings.warn(
                        f"ZOOptimizer: in param group {gi}, eps*scale = {d:.3g} is below half an "
                        f"ulp for {share:.0%} of the {dtype} weights (every |w| >= {thr:g}); "
                        "their perturbation rounds away and they get no gradient signal. Use a "
                        "larger eps or float32 weights", RuntimeWarning, stacklevel=3)

    # -- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> float:  # type: ignore[override]
        """One ZO step: 2S forward passes, 2S+1 in-place passes over the weights, no extra tensors.

        Args:
            closure: required; runs the forward pass on one batch (the same batch every call) and
                returns the scalar loss (a 0-dim tensor or a float), or ``(loss, n)`` with ``n``
                the number of samples the loss averages (used to weight ranks with a
                ``process_group``). Called 2S times under ``torch.no_grad()``; it must not call
                ``backward()``. With a ``process_group``: this rank's shard of the batch.

        Returns:
            The mean of the 2S losses (Python float); with a ``process_group``, of the
            all-reduced losses, the same on every rank. NaN/inf if the step was skipped.

        Raises:
            TypeError: no closure, or the closure returned something other than a scalar loss
                (the weights are restored first).
            RuntimeError: ``max_skips`` consecutive skipped steps.
            Anything the closure raises, after the weights are restored.
        """
        if closure is None or not callable(closure):
            raise TypeError("ZOOptimizer.step needs a closure that runs the forward pass and "
                            f"returns the loss, got {closure!r}")
        self._validate()
        self._check_precision()
        seeds = self.sample_seeds()
        self._displaced = True  # the in-place walk leaves w - eps*c*z(last) (exact: see _spsa_modes)
        losses, grads, ok = self._spsa(closure, seeds, keep_last=True)
        mean_loss = sum(losses) / len(losses)
        if ok:
            last = seeds[-1]
            restore = self._displaced
            plans = {}
            for gi, group in enumerate(self.param_groups):
                upd, decay = self._update_coeffs(group, grads, None)
                plans[id(group)] = (((self._ec(group) * decay,) if restore else ()) + upd, decay)
            if all(abs(c) <= _FP32_MAX for cs, _ in plans.values() for c in cs):
                self._apply_groups(([last] if restore else []) + seeds, lambda g: plans[id(g)])
            else:  # an update too large for float32: treat as a non-finite step
                if restore:
                    self._undo(last, -1.0)
                ok = False
        self._finish(ok, "loss" if not all(map(math.isfinite, losses)) else "update")
        return mean_loss

    @torch.no_grad()
    def estimate(self, closure: Callable[[], torch.Tensor | float],
                 seeds: Sequence[int] | None = None) -> ZOEstimate:
        """Projected gradients for S directions, without updating (for federated/distributed use).

        Args:
            closure: as for :meth:`step`.
            seeds: the directions' seeds (any count >= 1, ints in ``[0, 2**64)``), e.g. handed out
                by a server; default :meth:`sample_seeds` of the current step.

        Returns:
            :class:`ZOEstimate` ``(seeds, projected_grads, loss)``. The weights are left where they
            were (up to restore rounding); the step counter does not advance. A non-finite loss
            stops the evaluation: that sample's and later samples' gradients are NaN. With a
            ``process_group`` the losses are all-reduced as in :meth:`step` (every rank must pass
            the same ``seeds``), so every rank gets the same estimate.
        """
        if closure is None or not callable(closure):
            raise TypeError(f"ZOOptimizer.estimate needs a closure, got {closure!r}")
        if seeds is None:
            seeds = self.sample_seeds()
        else:
            if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
                raise TypeError(f"estimate: seeds must be a sequence of ints, got "
                                f"{type(seeds).__name__}")
            seeds = [_check_seed(s, f"estimate: seeds[{i}]") for i, s in enumerate(seeds)]
            if not seeds:
                raise ValueError("estimate: seeds must hold at least one seed")
        self._validate()
        self._check_precision()
        losses, grads, ok = self._spsa(closure, list(seeds), keep_last=False)
        grads = grads + [math.nan] * (len(seeds) - len(grads))
        return ZOEstimate(list(seeds), grads, sum(losses) / len(losses))

    @torch.no_grad()
    def apply(self, seeds: Sequence[int], coeffs: Sequence[float], decay: float = 1.0) -> None:
        """``w = w * decay + sum_k coeffs[k] * z(seeds[k])`` over all parameters, in one pass.

        The same coefficients apply to every group (the caller folds in learning rates); ``decay``
        defaults to 1. Does not advance the step counter. Raises (before any change) on unequal
        lengths, seeds outside ``[0, 2**64)`` or non-finite coefficients.
        """
        self._check_params()
        ts = [p.detach() for p in self._params()]
        zo_kernels.apply_seeds_(ts, seeds, coeffs, decay, self.dist, self.backend, 0)

    @torch.no_grad()
    def apply_estimate(self, estimate: ZOEstimate, lr: float | None = None) -> None:
        """Apply the update of an estimate: ``-lr*scale*g_s/S`` per seed, decay ``1 - lr*wd``.

        Per group (its own ``lr``, ``scale``, ``weight_decay`` and ``eps`` ratio, as in
        :meth:`step`); ``lr`` overrides every group's learning rate. Advances the step counter. A
        non-finite projected gradient skips the update (skip counters, warning, ``max_skips``).
        """
        if not hasattr(estimate, "seeds") or not hasattr(estimate, "projected_grads"):
            raise TypeError(f"apply_estimate: expected a ZOEstimate, got {type(estimate).__name__}")
        seeds = [_check_seed(s, f"apply_estimate: seeds[{i}]")
                 for i, s in enumerate(estimate.seeds)]
        grads = [_real(g, f"apply_estimate: projected_grads[{i}]")
                 for i, g in enumerate(estimate.projected_grads)]
        if not seeds or len(seeds) != len(grads):
            raise ValueError(f"apply_estimate: {len(seeds)} seeds and {len(grads)} projected "
                             "gradients; need the same number, at least one")
        if lr is not None:
            lr_f = _real(lr, "lr")
            if not (math.isfinite(lr_f) and lr_f >= 0.0):
                raise ValueError(f"Invalid learning rate lr = {lr!r}: must be finite and >= 0")
            for gi, g in enumerate(self.param_groups):
                if lr_f * _real(g["weight_decay"], "weight_decay") >= 1.0:
                    raise ValueError(f"Invalid lr = {lr!r}: lr * weight_decay of group {gi} >= 1")
        self._validate()
        ok = all(map(math.isfinite, grads))
        if ok:
            plans = {id(g): self._update_coeffs(g, grads, lr) for g in self.param_groups}
            ok = all(abs(c) <= _FP32_MAX for cs, _ in plans.values() for c in cs)
            if ok:
                self._apply_groups(seeds, lambda g: plans[id(g)])
        self._finish(ok, "projected gradient")


# ------------------------------------------------------------------------------------------------
# BatchNorm helpers
# ------------------------------------------------------------------------------------------------
def _stat_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
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
