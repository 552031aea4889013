"""ZOOptimizer: a drop-in ``torch.optim`` optimizer that trains with forward passes only.

The step is SPSA with seed-regenerated noise (docs/DESIGN.md, "The ZO step"), fused into
:func:`zo_kernels.apply_seeds_` so that no noise tensor, gradient or weight copy ever exists: a step
needs the memory of inference. See :class:`ZOOptimizer` for the algorithm and its guarantees.

The class validates its arguments, holds the integer state (step, seed, skip counters) and calls
the functional core (:mod:`.functional`: :func:`~.functional.zo_step`,
:func:`~.functional.spsa_estimate`, :func:`~.functional.apply_update`), which holds the arithmetic.
Data parallelism is in :mod:`.distributed`, the precision warning in :mod:`.precision`, the
BatchNorm helpers in :mod:`.batchnorm`.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

import zo_kernels

from . import distributed, parallel as _parallel
from .exact_chunked import DEFAULT_CHUNK_BYTES
from .functional import FlatParams, GroupHypers, apply_update, flat_params, spsa_estimate, zo_step
from .modes import estimate_modes
from .precision import warn_vanishing_perturbation
from .state_checks import check_param_storage, check_zo_state_dict
from ..seeds import SEED_SCHEME_VERSION, sample_seeds

__all__ = ["ZOOptimizer", "ZOEstimate"]


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
    """``backend`` normalized by :func:`zo_kernels.normalize_backend` (``"auto"`` -> None)."""
    try:
        return zo_kernels.normalize_backend(backend)
    except ValueError:
        raise ValueError(f"Invalid backend = {backend!r}: expected None or 'auto' (automatic) or "
                         f"one of {', '.join(map(repr, zo_kernels.BACKENDS))}") from None


def _check_max_skips(max_skips):
    if max_skips is None:
        return None
    if isinstance(max_skips, bool) or not isinstance(max_skips, numbers.Integral) or max_skips < 1:
        raise ValueError(f"Invalid max_skips = {max_skips!r}: must be None or an int >= 1")
    return int(max_skips)


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

    **Algorithm** (docs/DESIGN.md, "The ZO step"; the functions of :mod:`.functional`). The
    parameters, in ``param_groups`` order then parameter order, form one flat vector (each tensor
    starts on a 128-element block, :func:`zo_kernels.offsets`). Step ``t`` draws S directions
    ``z_s`` (Rademacher ±1, or Gaussian) from the seeds ``derive_seed(seed, t, s)``
    (:func:`zowarmup.seeds.derive_seed`); with ``c = scale`` and per-group ``eps``, ``lr``, ``wd``::

        for s in 0..S-1:
            w += eps*c*z_{s-1} + eps*c*z_s      # restore the previous sample, perturb (one pass)
            L+ = closure()
            w -= 2*eps*c*z_s;  L- = closure()
            g_s = (L+ - L-) / (2*eps)
        w = (1 - lr*wd) * w + (1 - lr*wd)*eps*c*z_{S-1} - sum_s lr*c*g_s/S * z_s    # one pass

    That is 2S forward passes and 2S+1 passes over the weights, each one
    :func:`zo_kernels.apply_seeds_` call that regenerates the noise from the seeds: no noise
    tensor, no gradient and no weight copy is ever allocated. The restore coefficient in the last
    pass is multiplied by the decay ``1 - lr*wd`` so that weight decay acts on the restored
    weights, and it is added to the update coefficient of ``z_{S-1}`` (the same direction), so the
    last pass sums S noise terms (:func:`.functional.final_pass`). In expectation the update is
    ``-lr * c**2 * grad L`` (``E[z z^T] = I``), so the effective SGD learning rate is
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
        backend: ``None`` or ``"auto"`` (automatic; stored as None) or one of ``"reference"``,
            ``"cpu"``, ``"triton"``, ``"cuda"``.
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
        self.data_group = distributed.check_process_group(data_group)
        self.num_samples = _check_num_samples(num_samples)
        self.dist = _check_dist(dist)
        self.backend = _check_backend(backend)
        self.max_skips = _check_max_skips(max_skips)
        #: The torch.distributed process group whose ranks share each step (None: one process).
        #: Not saved by pickling or ``state_dict``.
        self.process_group = distributed.check_process_group(process_group)
        #: Integer state, saved by :meth:`state_dict` as Python ints: ``step`` (steps taken,
        #: skipped ones included), ``seed``, ``skipped_steps``, ``consecutive_skips``.
        self.zo_state = {"step": 0, "seed": zo_kernels.check_seed(seed, "seed"), "skipped_steps": 0,
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
        check_zo_state_dict(state_dict)  # strict: types, ranges, consistency (state_checks.py)
        if not isinstance(state_dict, dict) or "zo" not in state_dict:
            raise ValueError("ZOOptimizer.load_state_dict: the state dict has no 'zo' entry; it was "
                             "not written by ZOOptimizer.state_dict()")
        zo = dict(state_dict["zo"])
        try:
            new_state = {"step": int(zo["step"]),
                         "seed": zo_kernels.check_seed(zo["seed"], "zo['seed']"),
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
        check_param_storage(devices)  # one device here; not meta (state_checks.py)

    def _validate(self) -> None:
        """Everything a step relies on; raises before any weight changes."""
        distributed.check_still_initialized(self.process_group)
        _check_num_samples(self.num_samples)
        _check_dist(self.dist)
        _check_backend(self.backend)
        for gi, g in enumerate(self.param_groups):
            _check_hypers(g["lr"], g["eps"], g["scale"], g["weight_decay"], gi)
        self._check_params()

    def _eps_ref(self) -> float:
        """The default ``eps``: the step every projected gradient is relative to."""
        return _real(self.defaults["eps"], "eps")

    def _hypers(self, lr=None) -> list[GroupHypers]:
        """Each group's hyper-parameters as floats (``lr``, when given, overrides every group's)."""
        return [GroupHypers(_real(g["lr"] if lr is None else lr, "lr"), _real(g["eps"], "eps"),
                            _real(g["scale"], "scale"), _real(g["weight_decay"], "weight_decay"))
                for g in self.param_groups]

    def _modes(self) -> bool:
        """Exact mode or perturbation-parallel ranks (:func:`.modes.estimate_modes`)."""
        return self.exact or self.parallel == "samples"

    def _estimate_modes(self, flat: FlatParams, hypers, closure, seeds, keep_last: bool):
        return estimate_modes(flat, list(self._params()), hypers, closure, seeds,
                              self._eps_ref(), exact=self.exact,
                              chunk_bytes=self.exact_chunk_bytes,
                              process_group=self.process_group,
                              samples=self.parallel == "samples", data_group=self.data_group,
                              keep_last=keep_last)

    def _flat(self) -> FlatParams:
        """The parameters as one flat noise vector, for the functional core."""
        return flat_params([g["params"] for g in self.param_groups], self.dist, self.backend)

    def _finish(self, ok: bool, what: str) -> None:
        """Advance the step counter; for a skipped step (``ok`` False, ``what`` not finite) count
        it, warn once per optimizer and raise after ``max_skips`` consecutive ones."""
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

    def _check_precision(self, hypers: Sequence[GroupHypers]) -> None:
        """Warn when eps*scale is below half an ulp for a sizable share of a group's weights."""
        warn_vanishing_perturbation([g["params"] for g in self.param_groups],
                                    [h.eps_c for h in hypers], self._warned, stacklevel=3)

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
        hypers = self._hypers()
        self._check_precision(hypers)
        seeds = self.sample_seeds()
        # an update too large for float32 is skipped like a non-finite loss
        if self._modes():
            flat, eps = self._flat(), self._eps_ref()
            res, displaced = self._estimate_modes(flat, hypers, closure, seeds, keep_last=True)
            losses, grads, ok = res
            if ok:  # exact mode: nothing to restore, the update is the only write
                ok = apply_update(flat, hypers, seeds, grads, eps,
                                  restore_seed=seeds[-1] if displaced else None)
        else:
            losses, _, ok = zo_step(self._flat(), hypers, closure, seeds, self._eps_ref(),
                                    process_group=self.process_group)
        self._finish(ok, "loss" if not all(map(math.isfinite, losses)) else "update")
        return sum(losses) / len(losses)

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
            seeds = [zo_kernels.check_seed(s, f"estimate: seeds[{i}]")
                     for i, s in enumerate(seeds)]
            if not seeds:
                raise ValueError("estimate: seeds must hold at least one seed")
        self._validate()
        hypers = self._hypers()
        self._check_precision(hypers)
        if self._modes():
            (losses, grads, _), _ = self._estimate_modes(self._flat(), hypers, closure,
                                                         list(seeds), keep_last=False)
        else:
            losses, grads, _ = spsa_estimate(self._flat(), hypers, closure, list(seeds),
                                             self._eps_ref(), process_group=self.process_group)
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
        seeds = [zo_kernels.check_seed(s, f"apply_estimate: seeds[{i}]")
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
        if ok:  # False when a coefficient is beyond float32: skipped, nothing applied
            ok = apply_update(self._flat(), self._hypers(lr), seeds, grads, self._eps_ref())
        self._finish(ok, "projected gradient")
