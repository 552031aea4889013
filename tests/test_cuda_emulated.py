"""The CUDA kernel's own source (csrc/cuda/apply_seeds_kernel.cuh) executed on the CPU.

No GPU here, so tests/cuda_emu compiles the kernel header as host C++ (cuda_shim.h stands in for the
few CUDA built-ins it uses: __fadd_rn/__fmul_rn round once, no FMA; 128-bit accesses abort when
misaligned; half conversions round to nearest even) and runs each CTA's 256 threads as coroutines
with a real barrier, CTAs one after another. The descriptor and tile tables are the ones
``zo_kernels._gpu`` builds for the launch. Checked bit for bit against the numpy reference: aligned
lists (the 128-bit path, counted), unaligned offsets (the scalar path), K = 0..3 and 33/63/64/65
(seed chunks of 32 and groups of 4), mixed dtypes, NaN/inf bits against the CPU kernel; Gaussian
within tolerance. What this cannot show: timing, occupancy, real memory-model behaviour (the CTA's
threads run one at a time between barriers, which a correct kernel must tolerate anyway).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import zo_kernels
from test_gpu_path import (ALIGNED_SHAPES, ALIGNED_SHAPES_K, _special_tensor, assert_bits_equal,
                           expected, make_case, make_tensors)
from zo_kernels import _gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_f16c() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " f16c" in f.read()
    except OSError:
        return False


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ to build the CUDA-kernel emulator")
    if not _has_f16c():
        pytest.skip("the emulator's half conversions need a CPU with F16C")
    so = tmp_path_factory.mktemp("cuda_emu") / "emu.so"
    cmd = [gxx, "-O2", "-std=c++20", "-mf16c", "-ffp-contract=off", "-fno-fast-math", "-shared",
           "-fPIC", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{os.path.join(ROOT, 'tests', 'cuda_emu')}",
           os.path.join(ROOT, "tests", "cuda_emu", "emu.cpp"), "-o", str(so)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lib = ctypes.CDLL(str(so))
    lib.emu_apply_seeds_mt.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_float, ctypes.c_int]
    lib.emu_apply_seeds_mt.restype = ctypes.c_int
    lib.emu_vector_access_count.restype = ctypes.c_longlong
    lib.emu_set_reverse.argtypes = [ctypes.c_int]
    return lib


def run_emu(lib, ts, seeds, coeffs, decay=1.0, dist="rademacher", offset=0) -> int:
    """``apply_seeds_`` through the emulated CUDA kernel, in place on CPU tensors ``ts``, with the
    launch tables of ``_gpu``; returns the number of 128-bit accesses executed."""
    bases = zo_kernels.offsets(ts, offset)
    keep = [(t, b) for t, b in zip(ts, bases) if t.numel() > 0]
    plan = _gpu.Plan(torch.device("cpu"), [t.data_ptr() for t, _ in keep],
                     [t.numel() for t, _ in keep], [t.dtype for t, _ in keep],
                     [b for _, b in keep])
    desc, tiles, n_ctas = plan.tiles(_gpu.CUDA_TILE_BLOCKS)
    s = torch.tensor([x - 2**64 if x >= 2**63 else x for x in seeds], dtype=torch.int64)
    c = torch.tensor(coeffs, dtype=torch.float32)
    v0 = lib.emu_vector_access_count()
    rc = lib.emu_apply_seeds_mt(desc.data_ptr(), tiles.data_ptr(), plan.T, n_ctas, s.data_ptr(),
                                c.data_ptr() if len(coeffs) else None, len(seeds), float(decay),
                                1 if dist == "gaussian" else 0)
    assert rc == 0, "a CTA barrier was not reached by every thread"
    return lib.emu_vector_access_count() - v0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_aligned_lists_use_128bit_path_bit_exact(emu, dtype):
    ts = make_tensors(ALIGNED_SHAPES, dtype, seed=1)
    seeds, coeffs = make_case(7, seed=2)
    xs = [t.clone() for t in ts]
    vec = run_emu(emu, xs, seeds, coeffs, 0.999)
    assert vec > 0
    for i, (x, w) in enumerate(zip(xs, expected(ts, seeds, coeffs, 0.999))):
        assert_bits_equal(x, w, f"{dtype} tensor {i}")


@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("K", [0, 1, 2, 3, 33, 63, 64, 65, 97])
def test_seed_counts_bit_exact(emu, K, reverse):
    """Chunks of 32 seeds in shared memory: partial (33, 63), exact (64), a one-seed third chunk
    (65), four chunks (97); K <= 3 and K = 0 (decay only). Threads scheduled forward and in
    reverse between barriers: the shared-memory phases do not depend on the order."""
    ts = make_tensors(ALIGNED_SHAPES_K + [(129,)], torch.float32, seed=K)
    seeds, coeffs = make_case(K, seed=K)
    xs = [t.clone() for t in ts]
    emu.emu_set_reverse(reverse)
    try:
        run_emu(emu, xs, seeds, coeffs, 0.999)
    finally:
        emu.emu_set_reverse(0)
    for i, (x, w) in enumerate(zip(xs, expected(ts, seeds, coeffs, 0.999))):
        assert_bits_equal(x, w, f"K={K} tensor {i}")


def test_unaligned_offset_mixed_dtypes_scalar_path(emu):
    """Bases not multiples of 16 (offset 2**32 + 5): only the scalar, bounds-checked path runs."""
    ts = make_tensors([(127,), (4097,), (3, 43), (129,), (8200,)],
                      [torch.float32, torch.bfloat16, torch.float16, torch.float32,
                       torch.bfloat16], seed=3)
    seeds, coeffs = make_case(9, seed=4)
    start = 2**32 + 5
    xs = [t.clone() for t in ts]
    assert run_emu(emu, xs, seeds, coeffs, 0.5, offset=start) == 0
    for i, (x, w) in enumerate(zip(xs, expected(ts, seeds, coeffs, 0.5, start=start))):
        assert_bits_equal(x, w, f"tensor {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [384, 4096])
def test_nan_inf_bits_match_cpu(emu, dtype, n):
    """NaN (both signs, payloads, signalling), inf, max (overflow), subnormals, -0: the CPU kernel's
    bits, on the scalar path (384) and the 128-bit path (4096)."""
    if not zo_kernels.backends()["cpu"]["usable"]:
        pytest.skip("the CPU kernel is not built: nothing to compare with")
    x = _special_tensor(dtype, n)
    big = 1e38 if dtype == torch.float32 else 7e4
    seeds, coeffs = [1, 2, 3], [1e-3, 2e-3, big]
    for decay in (1.0, 0.5):
        want = x.clone()
        zo_kernels.apply_seeds_([want], seeds, coeffs, decay, backend="cpu")
        got = x.clone()
        run_emu(emu, [got], seeds, coeffs, decay)
        assert_bits_equal(got, want, f"{dtype} n={n} decay={decay}")


def test_gaussian_within_tolerance(emu):
    ts = make_tensors([(4096,), (129,)], torch.float32, seed=7)
    seeds, coeffs = make_case(3, seed=8)
    xs = [t.clone() for t in ts]
    run_emu(emu, xs, seeds, coeffs, 0.999, dist="gaussian")
    atol = 2e-6 * float(np.abs(np.float32(coeffs)).sum()) + 1e-6
    for x, w in zip(xs, expected(ts, seeds, coeffs, 0.999, "gaussian")):
        torch.testing.assert_close(x, w, rtol=1e-6, atol=atol)


def test_emulator_detects_a_wrong_kernel(emu):
    """Guard: the comparison fails when the result is off (a different decay here), so the tests
    above can fail."""
    ts = make_tensors([(4096,)], torch.float32, seed=9)
    seeds, coeffs = make_case(5, seed=10)
    xs = [t.clone() for t in ts]
    run_emu(emu, xs, seeds, coeffs, 0.998)
    with pytest.raises(AssertionError):
        assert_bits_equal(xs[0], expected(ts, seeds, coeffs, 0.999)[0], "guard")
