"""On-device memory per training method: by formula for any model, and measured for a call.

- By formula: :func:`model_memory_table` (the paper's Table 1) from :func:`activation_profile`,
  the per-layer activation sizes of one forward.
- Measured: :func:`measure_peak` runs a function (an inference pass, a ZO step on a whole local
  dataset in micro-batches, a backprop step) and records the peak of live tensor bytes. On CUDA it
  reads ``torch.cuda.max_memory_allocated``; on the CPU, where torch keeps no allocator statistics,
  a ``TorchDispatchMode`` tracks every tensor storage an operator creates until it is freed
  (weights that exist before the call are counted once, as the baseline). Allocator caching and
  fragmentation are not included in either. :func:`tensor_bytes` is a model's parameter and buffer
  bytes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:  # weak references to storages (so freed storages leave the live set)
    from torch.multiprocessing.reductions import StorageWeakRef
except Exception:  # pragma: no cover
    StorageWeakRef = None


import torch.nn as nn

from .models import _pos_int

__all__ = ["model_memory_table", "activation_profile", "MEMORY_METHODS", "measure_peak",
           "tensor_bytes"]


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by operators while active; records the peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple] = {}
        self.current = 0
        self.peak = 0
        self._ops = 0

    def _sweep(self):
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._ops += 1
        self._sweep()
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                try:
                    st = t.untyped_storage()
                except Exception:
                    continue
                key = st.data_ptr()
                if key in self.live and not self.live[key][0].expired():
                    continue
                nbytes = st.nbytes()
                self.live[key] = (StorageWeakRef(st), nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def measure_peak(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors allocated (and still alive at the same time) while ``fn()`` runs.

    Tensors that exist before the call (weights, data) are not included: add them separately.
    CUDA: ``max_memory_allocated`` minus the allocation at entry. CPU: the dispatch-mode tracker
    described in the module docstring.

    Raises:
        RuntimeError: when it cannot measure (no ``StorageWeakRef`` in this torch for the CPU
            tracker, or a device type other than ``cpu`` and ``cuda``); there is no sentinel
            value, so a caller never mistakes "not measured" for a number.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu":
        raise RuntimeError(f"measure_peak: cannot measure on device type {device.type!r} "
                           "(cpu and cuda only)")
    if StorageWeakRef is None:
        raise RuntimeError("measure_peak: this torch has no StorageWeakRef "
                           "(torch.multiprocessing.reductions), so the CPU tracker cannot tell "
                           "freed storages from live ones; set measure_memory=false to skip "
                           "the measured memory report")
    mode = _LiveBytes()
    with mode:
        fn()
    return int(mode.peak)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return (sum(p.numel() * p.element_size() for p in model.parameters())
            + sum(b.numel() * b.element_size() for b in model.buffers()))


# --------------------------------------------------------------------------------------------------
# Memory by formula (the paper's Table 1)
# --------------------------------------------------------------------------------------------------

#: Methods :func:`model_memory_table` knows, with the aliases it accepts.
MEMORY_METHODS = ("inference", "zo", "mezo", "backprop_sgd", "backprop_sgdm", "backprop_adam")
# FedAvg and FedAdam clients both run plain SGD (FedAdam's Adam state lives on the server), so both
# alias backprop_sgd.
_ALIASES = {"zowarmup": "zo", "zo_fused": "zo", "fedavg": "backprop_sgd", "fedadam": "backprop_sgd",
            "backprop": "backprop_sgd", "sgd": "backprop_sgd", "sgdm": "backprop_sgdm",
            "adam": "backprop_adam"}
_OPT_STATES = {"backprop_sgd": 0, "backprop_sgdm": 1, "backprop_adam": 2}


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def activation_profile(model: nn.Module, input_shape, batch_size: int = 1,
                       dtype: torch.dtype | None = None) -> dict:
    """Activation sizes from one forward pass with hooks on every leaf module.

    The forward runs on ONE sample (eval mode, ``torch.no_grad``; the model's train/eval flags are
    restored afterwards) on the model's device and in its parameter dtype, or ``dtype`` if given;
    a model on the ``meta`` device runs without computing anything. Sizes are then multiplied by
    ``batch_size``: activations of the models here are linear in the batch.

    Args:
        model: any ``nn.Module`` taking one tensor.
        input_shape: per-sample shape, e.g. ``(3, 32, 32)`` (no batch dimension).
        batch_size: samples per forward.
        dtype: input dtype (default: the first floating parameter's dtype, else float32).

    Returns:
        dict with (all bytes, for ``batch_size`` samples):
        ``input_bytes``; ``layer_peak_bytes`` = max over leaf modules of (input + output bytes), the
        live activations while one layer runs; ``total_bytes`` = input + the sum of every leaf's
        output, what backprop keeps for the backward pass; ``layers`` = list of
        ``(module_name, input_bytes, output_bytes)``.
    """
    batch_size = _pos_int("batch_size", batch_size)
    try:
        input_shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a per-sample shape such as (3, 32, 32), got "
                         f"{input_shape!r}") from None
    if not input_shape or any(s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be a per-sample shape of positive sizes, got "
                         f"{input_shape!r}")
    params = [p for p in model.parameters()] + [b for b in model.buffers()]
    device = params[0].device if params else torch.device("cpu")
    if dtype is None:
        dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    layers: list[tuple[str, int, int]] = []
    handles = []
    for mod_name, m in model.named_modules():
        if next(m.children(), None) is None:
            def hook(mod, args, out, _n=mod_name):
                layers.append((_n, _tensor_bytes(args), _tensor_bytes(out)))
            handles.append(m.register_forward_hook(hook))
    flags = {m: m.training for m in model.modules()}
    x = torch.zeros((1, *input_shape), dtype=dtype, device=device)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, f in flags.items():
            m.training = f
    in_b = _tensor_bytes(x)
    peak = max([i + o for _, i, o in layers], default=in_b)
    total = in_b + sum(o for _, _, o in layers)
    return {"input_bytes": in_b * batch_size, "layer_peak_bytes": peak * batch_size,
            "total_bytes": total * batch_size,
            "layers": [(n, i * batch_size, o * batch_size) for n, i, o in layers]}


def model_memory_table(model: nn.Module, batch_size: int, input_shape,
                       methods=MEMORY_METHODS, dtype: torch.dtype | None = None) -> dict:
    """On-device training memory per method, by formula (the paper's Table 1), for any model.

    Terms (bytes): ``W`` = parameters + buffers in their dtypes; ``G`` = trainable parameters (one
    gradient each, same dtype); ``P`` = the largest single parameter tensor; ``A1`` = activations
    live while one layer runs (:func:`activation_profile` ``layer_peak_bytes``); ``A`` = all
    activations kept for backprop (``total_bytes``). ``batch_size`` is the samples per forward
    (for ZO: the micro-batch, since the whole-dataset step is evaluated in micro-batches).

    ============== ================= ===========================================================
    method         formula           why
    ============== ================= ===========================================================
    inference      W + A1            a forward frees each activation once the next layer ran
    zo             W + A1            ours: noise is regenerated inside the fused kernels, never
                                     stored; the S projected gradients are S floats
    mezo           W + A1 + P        MeZO materializes z for one parameter tensor at a time
    backprop_sgd   W + G + A         FedAvg client SGD (no momentum)
    backprop_sgdm  W + 2G + A        + a momentum buffer
    backprop_adam  W + 3G + A        + Adam's two moments
    ============== ================= ===========================================================

    These are lower bounds that ignore allocator overhead, framework workspace and temporaries
    inside a layer (e.g. attention scores), which is why the measured peak is reported beside them.

    Args:
        model: any ``nn.Module`` taking one tensor.
        batch_size: samples per forward.
        input_shape: per-sample input shape, e.g. ``(3, 32, 32)``.
        methods: names from :data:`MEMORY_METHODS`, or the aliases ``zowarmup``/``zo_fused``
            (zo), ``fedavg``/``fedadam``/``backprop``/``sgd`` (backprop_sgd: in both FedAvg and
            FedAdam the client runs SGD; FedAdam's moments live on the server), ``sgdm``
            (backprop_sgdm), ``adam`` (backprop_adam). Output keys are the names as given.
        dtype: activation dtype (default: the model's parameter dtype).

    Returns:
        ``{method: {"total_bytes", "weights", "grads", "optimizer_state", "activations", "noise",
        "formula", "vs_inference"}}``, all sizes in bytes (ints); ``vs_inference`` = total /
        inference total.
    """
    if isinstance(methods, str):
        methods = (methods,)
    canon = {}
    for m in methods:
        c = _ALIASES.get(m, m)
        if c not in MEMORY_METHODS:
            raise ValueError(f"unknown memory method {m!r}; expected one of "
                             f"{', '.join(MEMORY_METHODS + tuple(_ALIASES))}")
        canon[m] = c
    prof = activation_profile(model, input_shape, batch_size, dtype)
    seen = set()
    w = g = p_max = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        b = p.numel() * p.element_size()
        w += b
        p_max = max(p_max, b)
        if p.requires_grad:
            g += b
    w += sum(b.numel() * b.element_size() for b in model.buffers())
    a1, a = prof["layer_peak_bytes"], prof["total_bytes"]
    inference = w + a1
    table = {}
    for name, c in canon.items():
        row = {"weights": w, "grads": 0, "optimizer_state": 0, "activations": a1, "noise": 0}
        if c in ("inference", "zo"):
            row["formula"] = "W + A1"
        elif c == "mezo":
            row["noise"] = p_max
            row["formula"] = "W + A1 + P"
        else:
            k = _OPT_STATES[c]
            row.update(grads=g, optimizer_state=k * g, activations=a)
            row["formula"] = "W + G + A" if k == 0 else f"W + {k + 1}G + A"
        row["total_bytes"] = (row["weights"] + row["grads"] + row["optimizer_state"]
                              + row["activations"] + row["noise"])
        row["vs_inference"] = row["total_bytes"] / inference
        table[name] = row
    return table
