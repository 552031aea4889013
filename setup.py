"""Build of the compiled backends.

- ``zo_kernels._C``: the C++/OpenMP CPU backend. Always built.
- ``zo_kernels._C_cuda``: the CUDA C++ backend, built when a CUDA toolkit (nvcc, ``CUDA_HOME``) and a
  CUDA build of torch are present. ``ZO_KERNELS_CUDA=0`` forces it off, ``ZO_KERNELS_CUDA=1`` forces it
  on (a missing toolkit is then an error). Unset: a missing toolkit warns and the CPU build goes on.
- ``ZO_KERNELS_NATIVE=1`` adds ``-march=native`` (the binary then runs only on CPUs like the build
  machine's); by default the CPU kernel is compiled for several x86-64 levels and picks one at run time.

Install with ``pip install --no-build-isolation -e ".[dev]"`` after torch (an isolated build would
install torch a second time).
"""
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover
    sys.exit("zowarmup needs torch installed first: pip install torch==2.14.1 torchvision==0.29.1, "
             "then pip install --no-build-isolation -e .")

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ENV = "ZO_KERNELS_CUDA"


def _cuda_home():
    """First toolkit root that has both nvcc and the CUDA runtime library."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda", "/opt/cuda"]
    for home in cands:
        if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
            continue
        if any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib")):
            return home
    return None


def _want_cuda():
    flag = os.environ.get(CUDA_ENV, "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False, None
    home = _cuda_home()
    missing = []
    if torch.version.cuda is None:
        missing.append("torch is a CPU-only build")
    if home is None:
        missing.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if missing:
        msg = "zo_kernels: not building the CUDA backend: " + "; ".join(missing)
        if flag in ("1", "true", "on", "yes"):
            raise RuntimeError(msg + f" ({CUDA_ENV}=1 demands it)")
        warnings.warn(msg + f". Set {CUDA_ENV}=0 to silence this.")
        return False, None
    return True, home


cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]
if os.environ.get("ZO_KERNELS_NATIVE", "") == "1":
    cxx_flags.append("-march=native")

ext_modules = [
    cpp_extension.CppExtension(
        "zo_kernels._C",
        ["csrc/cpu/apply_seeds.cpp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

build_cuda, cuda_home = _want_cuda()
if build_cuda:
    os.environ.setdefault("CUDA_HOME", cuda_home)
    cpp_extension.CUDA_HOME = cuda_home
    # Without a GPU torch cannot detect the architecture. Default: Ampere code plus PTX, which the
    # driver JIT-compiles for newer GPUs (Hopper included); one nvcc pass keeps the build short.
    # Set TORCH_CUDA_ARCH_LIST (e.g. "9.0") to compile for specific GPUs.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX")
    ext_modules.append(
        cpp_extension.CUDAExtension(
            "zo_kernels._C_cuda",
            ["csrc/cuda/apply_seeds_cuda.cu"],
            include_dirs=[os.path.join(ROOT, "csrc")],
            # --fmad=false: no fused multiply-add, so p * decay + acc rounds exactly as on the CPU.
            extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                "nvcc": ["-O3", "--fmad=false", "-std=c++20"]},
        )
    )

class BuildExt(cpp_extension.BuildExtension):
    """Builds the optional CUDA extension on a best-effort basis: if it fails to compile (a toolkit
    without some headers, say) the install warns and goes on with the CPU backend, unless
    ZO_KERNELS_CUDA=1 demands it."""

    def build_extension(self, ext):
        if ext.name != "zo_kernels._C_cuda" or os.environ.get(CUDA_ENV, "") == "1":
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            warnings.warn(f"zo_kernels: building the CUDA backend failed ({exc}); continuing with the "
                          f"CPU backend only. Set {CUDA_ENV}=1 to make this an error.")
            self.extensions = [e for e in self.extensions if e is not ext]


setup(
    package_dir={"zo_kernels": "src/zo_kernels", "zowarmup": "python/zowarmup"},
    packages=find_packages("src") + find_packages("python"),
    package_data={"zowarmup": ["configs/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
