"""The build: which backends exist, the CUDA extension where a toolkit exists, and the portable CPU
path against the AVX-512 one (both compiled into the same binary)."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import zo_kernels

# CI sets ZO_REQUIRE_BACKENDS (e.g. "cpu,triton") so a backend that silently failed to build fails
# the run instead of turning its tests into skips.
REQUIRED = [b for b in os.environ.get("ZO_REQUIRE_BACKENDS", "").split(",") if b]


@pytest.mark.parametrize("name", REQUIRED or ["cpu"])
def test_required_backend_is_usable(name):
    rep = zo_kernels.backends()
    if not REQUIRED and not rep[name]["built"]:
        pytest.skip(f"backend {name!r} not built here ({rep[name]['why']}); "
                    "set ZO_REQUIRE_BACKENDS to make this a failure")
    assert rep[name]["usable"], f"backend {name!r} is required but not usable: {rep[name]['why']}"


def test_backends_report_shape():
    rep = zo_kernels.backends()
    assert set(rep) == {"reference", "cpu", "triton", "cuda"}
    for name, r in rep.items():
        assert set(r) == {"built", "usable", "devices", "why"}, name
        assert r["usable"] <= r["built"]
        if not r["usable"]:
            assert r["why"], f"{name} is unusable but says not why"
    assert rep["reference"]["usable"]


def _nvcc_present():
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def test_cuda_extension_builds_and_imports():
    if not _nvcc_present():
        pytest.skip("no nvcc on this machine: the CUDA extension is not built here")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: the CUDA extension is not built against it")
    if os.environ.get("ZO_KERNELS_CUDA", "") == "0":
        pytest.skip("ZO_KERNELS_CUDA=0 disabled the CUDA build")
    import importlib

    mod = importlib.import_module("zo_kernels._C_cuda")
    assert hasattr(mod, "apply_seeds_mt")  # one launch per tensor list (zo_kernels._gpu)
    rep = zo_kernels.backends()["cuda"]
    assert rep["built"]
    assert rep["usable"] == torch.cuda.is_available()


_SCRIPT = r"""
import hashlib, torch, zo_kernels
g = torch.Generator().manual_seed(5)
ts = [torch.randn(n, generator=g).to(dt) for n, dt in
      [(4097, torch.float32), (300000, torch.float32), (1000, torch.bfloat16), (777, torch.float16)]]
for K in (1, 7, 64, 70):
    seeds = [int(s) for s in torch.randint(0, 2**62, (K,), generator=g)]
    seeds[0] = 2**64 - 1
    zo_kernels.apply_seeds_(ts, seeds, (torch.randn(K, generator=g) * 1e-2).tolist(), 0.999,
                            backend="cpu")
h = hashlib.sha256()
for t in ts:
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.float32 else
             t.view(torch.int16).numpy().tobytes())
print(zo_kernels._backends.cpu_extension().cpu_isa(), h.hexdigest())
"""


def _run(env_extra):
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_portable_cpu_path_equals_simd_path():
    if not zo_kernels.backends()["cpu"]["usable"]:
        pytest.skip("cpu backend not built")
    isa_fast, h_fast = _run({})[-2:]
    isa_port, h_port = _run({"ZO_KERNELS_NO_AVX512": "1"})[-2:]
    assert isa_port != "avx512"
    assert h_fast == h_port, f"{isa_fast} and {isa_port} paths disagree"


def test_reference_matches_cpu_in_subprocess_hash():
    """The hash of the script above equals the same updates done by the reference path."""
    if not zo_kernels.backends()["cpu"]["usable"]:
        pytest.skip("cpu backend not built")
    ref_script = _SCRIPT.replace('backend="cpu"', 'backend="reference"').replace(
        "zo_kernels._backends.cpu_extension().cpu_isa()", "'reference'")
    out = subprocess.run([sys.executable, "-c", ref_script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == _run({})[-1]


def test_hash_helper_is_sensitive():
    # guard for the tests above: a one-ulp change must change the digest
    a = torch.ones(10)
    b = a.clone()
    b[3] = torch.nextafter(b[3], torch.tensor(2.0))
    ha = hashlib.sha256(a.numpy().tobytes()).hexdigest()
    hb = hashlib.sha256(b.numpy().tobytes()).hexdigest()
    assert ha != hb
