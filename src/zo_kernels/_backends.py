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


# --------------------------------------------------------------------------------------------
# CPU path (instruction set) of the C++ backend
# --------------------------------------------------------------------------------------------
#: Environment variable forcing the CPU backend's path: ``avx512``, ``avx2`` or ``portable`` (read
#: at import). A path above what the CPU runs falls back to the highest it runs, with a warning; an
#: unknown name makes every call on the CPU backend raise ValueError naming the variable.
ISA_ENV = "ZO_KERNELS_ISA"
#: Older switch, still honoured when ZO_KERNELS_ISA is unset: any value caps the path at ``avx2``.
NO_AVX512_ENV = "ZO_KERNELS_NO_AVX512"
CPU_PATHS = ("avx512", "avx2", "portable")

_isa_error = ""


def _init_isa() -> None:
    global _isa_error
    if _cpu_ext is None:
        return
    raw = os.environ.get(ISA_ENV, "").strip()
    want, source = raw.lower(), ISA_ENV
    if not want and os.environ.get(NO_AVX512_ENV) is not None:
        want, source = "avx2", NO_AVX512_ENV
    if not want:
        return
    if want not in CPU_PATHS:
        _isa_error = (f"{ISA_ENV}={raw!r} is not a CPU path; allowed: "
                      f"{', '.join(CPU_PATHS)} (or unset for the best this CPU runs)")
        return
    paths = list(_cpu_ext.isa_paths())
    if want not in paths:
        warnings.warn(f"zo_kernels: {source} asks for the {want} path, which this CPU does not run; "
                      f"using {paths[0]}", RuntimeWarning, stacklevel=3)
        want = paths[0]
    _cpu_ext.set_isa(want)


_init_isa()


def cpu_isa_error() -> str:
    """Why the CPU backend refuses to run (a bad ZO_KERNELS_ISA), or ""."""
    return _isa_error


def cpu_paths() -> list[str]:
    """CPU paths this machine executes, highest first (``[]`` without the C++ extension)."""
    return list(_cpu_ext.isa_paths()) if _cpu_ext is not None else []


def cpu_path() -> str | None:
    """Name of the CPU path in use (``avx512``, ``avx2`` or ``portable``), None without the
    extension."""
    return _cpu_ext.get_isa() if _cpu_ext is not None else None


def set_cpu_path(name: str) -> str:
    """Select the CPU path for later calls in this process; returns the previous one.

    ValueError for an unknown name or a path this CPU does not run. All paths give the same bits;
    this exists for tests and benchmarks (and ``ZO_KERNELS_ISA`` for whole processes).
    """
    if _cpu_ext is None:
        raise RuntimeError(f"zo_kernels: no CPU extension to select a path of ({_cpu_error})")
    return _cpu_ext.set_isa(name)


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
