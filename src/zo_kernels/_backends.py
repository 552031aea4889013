"""Which compiled backends exist, loaded once, with the reason when one is missing."""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

#: Environment variable read by ``setup.py`` to force the CUDA extension off ("0") or on ("1").
CUDA_ENV = "ZO_KERNELS_CUDA"

_cpu_ext = None
_cpu_error = ""
try:  # the C++/OpenMP CPU extension; built by every install
    from . import _C as _cpu_ext  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _cpu_error = f"zo_kernels._C could not be imported ({exc})"
    warnings.warn(
        f"{_cpu_error}; zo_kernels falls back to the pure-torch reference path, which is correct but "
        "slow. Reinstall with `pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning, stacklevel=2)


def cpu_extension():
    """The compiled CPU module, or None."""
    return _cpu_ext


@lru_cache(maxsize=None)
def cuda_extension():
    """(module or None, reason) for the CUDA C++ extension ``zo_kernels._C_cuda``."""
    try:
        mod = importlib.import_module("zo_kernels._C_cuda")
    except ImportError as exc:
        return None, f"zo_kernels._C_cuda is not built or does not import ({exc})"
    return mod, ""


@lru_cache(maxsize=None)
def triton_module():
    """(module or None, reason) for the Triton kernels (imports triton lazily: it is slow)."""
    try:
        mod = importlib.import_module("zo_kernels.triton_kernels")
    except Exception as exc:  # triton missing, or no driver
        return None, f"triton kernels unavailable ({type(exc).__name__}: {exc})"
    return mod, ""


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backends() -> dict:
    """Report each backend: ``{name: {"built": bool, "usable": bool, "devices": [...], "why": str}}``.

    ``built`` says the code is present; ``usable`` says it can run on this machine now; ``devices``
    lists the tensor device types it accepts; ``why`` explains a False.
    """
    import torch

    cuda_ok = torch.cuda.is_available()
    out = {"reference": {"built": True, "usable": True, "devices": ["cpu", "cuda"], "why": ""}}
    out["cpu"] = {"built": _cpu_ext is not None, "usable": _cpu_ext is not None, "devices": ["cpu"],
                  "why": _cpu_error}
    tmod, twhy = triton_module()
    t_devices = (["cuda"] if cuda_ok else []) + (["cpu"] if triton_interpreted() else [])
    if tmod is not None and not t_devices:
        twhy = "no CUDA device, and TRITON_INTERPRET=1 is not set"
    out["triton"] = {"built": tmod is not None, "usable": tmod is not None and bool(t_devices),
                     "devices": t_devices, "why": twhy}
    cmod, cwhy = cuda_extension()
    if cmod is not None and not cuda_ok:
        cwhy = "built, but no CUDA device is available"
    out["cuda"] = {"built": cmod is not None, "usable": cmod is not None and cuda_ok,
                   "devices": ["cuda"] if cuda_ok else [], "why": cwhy}
    return out
