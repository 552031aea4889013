"""The GPU path of ``apply_seeds_`` (Triton and the CUDA extension; host side in ``zo_kernels._gpu``).

Without a GPU, the Triton kernel runs in the interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1) and the CUDA sources are compiled, not run. Covered:

- bit-exactness against the independent numpy reference on the shapes real weights have
  (n % 16 == 0, 128-aligned bases: the vectorized specialization) and on unaligned ones, for
  K = 33, 63, 64, 65 (partial seed chunks and groups), mixed-dtype lists, decay, K = 0;
- NaN and inf bit patterns of float32/bfloat16/float16 against the CPU kernel;
- the batched subset-sum tables (host numpy, device ``tables_kernel``) against ``reference``;
- structure: one kernel launch per call, one non-blocking staging copy (none with device seeds and
  coefficients), no host read of device memory (a dispatch-mode log of every torch op, plus
  patched ``item``/``tolist``/``numpy``), descriptor plans cached per parameter list, the device
  guard entered with the tensors' device; with a GPU, ``torch.cuda.set_sync_debug_mode("error")``;
- compilation: the Triton kernel for sm_90 (no GPU needed) has 128-bit accesses in the aligned
  specialization and one Philox per (row, seed) per thread; the CUDA kernel compiles with nvcc to
  128-bit streaming accesses without register spills;
- a tensor on a second GPU, where one exists.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import _philox_np as ref
import zo_kernels
from zo_kernels import _gpu
from zo_kernels import reference as zref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_BACKENDS = ("triton", "cuda")
#: n % 16 == 0 everywhere, so every base is a multiple of 128 and the plan is "aligned"; sizes of
#: 1, 2 and 3 programs of the Triton kernel (32 blocks = 4096 elements each) and partial tiles.
ALIGNED_SHAPES = [(16,), (4096,), (33, 128), (3, 16), (8208,)]
#: The interpreter is slow: the K = 33..65 cases use fewer elements.
ALIGNED_SHAPES_K = [(48,), (4096,), (4224,)]


def require(backend: str) -> str:
    """Device to run ``backend`` on (CUDA if usable there, else the interpreter's CPU), or skip."""
    info = zo_kernels.backends()[backend]
    devices = info["devices"] if info["usable"] else []
    for dev in ("cuda", "cpu"):
        if dev in devices:
            return dev
    pytest.skip(f"backend {backend!r} not usable here: {info['why'] or info['devices']}")


def make_case(K: int, seed: int = 0):
    """K seeds (half >= 2**63, and 0 / 2**64-1 when K >= 7), K coefficients of mixed sign and
    magnitude (1e-4 .. 1), so that a different summation order shows in the bits."""
    rng = np.random.default_rng(seed)
    seeds = [int(x) for x in rng.integers(0, 2**63, size=K, dtype=np.int64)]
    seeds = [s + 2**63 if k % 2 else s for k, s in enumerate(seeds)]
    if K >= 7:
        seeds[1], seeds[2] = 2**64 - 1, 0
    coeffs = (rng.choice([-1.0, 1.0], K) * 10.0 ** rng.uniform(-4, 0, K)).tolist()
    return seeds, coeffs


def make_tensors(shapes, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not isinstance(dtypes, (list, tuple)):
        dtypes = [dtypes] * len(shapes)
    return [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]


def expected(ts, seeds, coeffs, decay, dist="rademacher", start=0):
    """numpy fp32 result per tensor (tests/_philox_np.py), rounded once to the tensor's dtype."""
    vals = [t.detach().float().cpu().reshape(-1).numpy() for t in ts]
    out = ref.apply_seeds_fp32(vals, seeds, coeffs, decay, dist, start)
    return [torch.from_numpy(o).reshape(t.shape).to(t.dtype) for o, t in zip(out, ts)]


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def assert_bits_equal(got, want, what=""):
    g, w = bits(got), bits(want)
    bad = (g != w).nonzero().flatten()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {g.numel()} elements differ, first at "
                              f"{int(bad[0])}: got {got.flatten()[bad[0]].item()!r}, want "
                              f"{want.flatten()[bad[0]].item()!r}")


def run_backend(backend, ts, seeds, coeffs, decay=1.0, dist="rademacher", offset=0):
    """Run ``backend`` on copies of ``ts`` on its device; results back on the CPU."""
    dev = require(backend)
    xs = [t.clone().to(dev) for t in ts]
    zo_kernels.apply_seeds_(xs, seeds, coeffs, decay, dist, backend=backend, offset=offset)
    return [x.cpu() for x in xs]


# ------------------------------------------------------------------------------------------------
# bit-exactness on the shapes that matter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_aligned_sizes_bit_exact(backend, dtype):
    """n % 16 == 0 with 128-aligned bases: the plan is aligned, so the vectorized specialization
    (128-bit accesses on a GPU) is what runs; K = 7 (a short last group), decay != 1."""
    require(backend)
    ts = make_tensors(ALIGNED_SHAPES, dtype, seed=1)
    assert _gpu.Plan(torch.device("cpu"), [256 * (i + 1) for i in range(len(ts))],
                     [t.numel() for t in ts], [t.dtype for t in ts],
                     zo_kernels.offsets(ts)).aligned
    seeds, coeffs = make_case(7, seed=2)
    got = run_backend(backend, ts, seeds, coeffs, 0.999)
    for i, (g, w) in enumerate(zip(got, expected(ts, seeds, coeffs, 0.999))):
        assert_bits_equal(g, w, f"{backend} {dtype} tensor {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("K", [33, 63, 64, 65])
def test_large_k_bit_exact(backend, K):
    """K around the CUDA kernel's 32-seed chunk and the 4-seed groups: partial second chunk (33,
    63), exact (64), a third chunk of one seed (65, a group of 1). Mixed magnitudes, so the grouped
    order is told apart from any other (see test_apply_seeds)."""
    require(backend)
    ts = make_tensors(ALIGNED_SHAPES_K, torch.float32, seed=K)
    seeds, coeffs = make_case(K, seed=K)
    got = run_backend(backend, ts, seeds, coeffs, 0.999)
    for i, (g, w) in enumerate(zip(got, expected(ts, seeds, coeffs, 0.999))):
        assert_bits_equal(g, w, f"{backend} K={K} tensor {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_unaligned_offset_and_mixed_dtypes(backend):
    """An offset that is not a multiple of 16 (the unaligned fallback), odd sizes and one list of
    float32/bfloat16/float16 (the kernel's per-tensor dtype branch), K = 5, offset past 2**32."""
    require(backend)
    ts = make_tensors([(127,), (4097,), (3, 43), (129,)],
                      [torch.float32, torch.bfloat16, torch.float16, torch.float32], seed=3)
    seeds, coeffs = make_case(5, seed=4)
    start = 2**32 + 5
    got = run_backend(backend, ts, seeds, coeffs, 0.5, offset=start)
    for i, (g, w) in enumerate(zip(got, expected(ts, seeds, coeffs, 0.5, start=start))):
        assert_bits_equal(g, w, f"{backend} tensor {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("K", [0, 1, 2, 3])
def test_small_k_bit_exact(backend, K):
    """K = 1, 2 (one Philox per row per seed, no padding), 3 (a padded group), 0 (decay only)."""
    require(backend)
    ts = make_tensors([(4096,), (129,)], torch.float32, seed=5 + K)
    seeds, coeffs = make_case(K, seed=6 + K)
    got = run_backend(backend, ts, seeds, coeffs, 0.75)
    for i, (g, w) in enumerate(zip(got, expected(ts, seeds, coeffs, 0.75))):
        assert_bits_equal(g, w, f"{backend} K={K} tensor {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gaussian_aligned(backend):
    """Gaussian noise on an aligned list: within float32 tolerance of numpy (seed order)."""
    require(backend)
    ts = make_tensors([(4096,), (48,)], torch.float32, seed=7)
    seeds, coeffs = make_case(3, seed=8)
    got = run_backend(backend, ts, seeds, coeffs, 0.999, dist="gaussian")
    atol = 2e-6 * float(np.abs(np.float32(coeffs)).sum()) + 1e-6
    for g, w in zip(got, expected(ts, seeds, coeffs, 0.999, "gaussian")):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=atol)


# ------------------------------------------------------------------------------------------------
# NaN and inf bit patterns against the CPU kernel
# ------------------------------------------------------------------------------------------------
_SPECIALS = {
    torch.float32: [0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0xFFAAAAAA, 0x7F800000,
                    0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000000, 0x3F800000],
    torch.bfloat16: [0x7FC0, 0xFFC0, 0x7FC1, 0x7F81, 0xFFAA, 0x7F80, 0xFF80, 0x7F7F, 0xFF7F,
                     0x0001, 0x8000, 0x3F80],
    torch.float16: [0x7E00, 0xFE00, 0x7E01, 0x7C01, 0xFD55, 0x7C00, 0xFC00, 0x7BFF, 0xFBFF,
                    0x0001, 0x8000, 0x3C00],
}


def _special_tensor(dtype, n=384):
    width = 32 if dtype == torch.float32 else 16
    it = torch.int32 if width == 32 else torch.int16
    pats = [p - (1 << width) if p >= 1 << (width - 1) else p for p in _SPECIALS[dtype]]
    return torch.tensor((pats * (n // len(pats) + 1))[:n], dtype=it).view(dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_nan_inf_bits_match_cpu(backend, dtype, decay):
    """Quiet and signalling NaNs of both signs with payloads, +-inf, +-max (the update overflows to
    inf), subnormals and -0: the GPU backend writes the CPU kernel's exact bits (a GPU's arithmetic
    would give its canonical NaN; the kernels write the CPU's patterns explicitly)."""
    require(backend)
    if not zo_kernels.backends()["cpu"]["usable"]:
        pytest.skip("the CPU kernel is not built: nothing to compare with")
    x = _special_tensor(dtype)
    big = 1e38 if dtype == torch.float32 else 7e4
    seeds, coeffs = [1, 2, 3], [1e-3, 2e-3, big]
    want = x.clone()
    zo_kernels.apply_seeds_([want], seeds, coeffs, decay, backend="cpu")
    got = run_backend(backend, [x], seeds, coeffs, decay)[0]
    assert bool(torch.isnan(want).any()) and bool(torch.isinf(want).any())
    assert_bits_equal(got, want, f"{backend} {dtype} decay={decay}")


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [0, 1, 2, 3, 4, 5, 7, 8, 33, 64, 65])
def test_batched_tables_equal_reference(K):
    rng = np.random.default_rng(K)
    c = (rng.choice([-1.0, 1.0], K) * 10.0 ** rng.uniform(-30, 38, K)).astype(np.float32)
    if K >= 5:
        c[1], c[2], c[3] = 0.0, -0.0, np.float32(1e-45)   # zeros give -0.0 entries; a subnormal
    want = zref.group_tables(torch.from_numpy(c))
    got = torch.from_numpy(_gpu.group_tables_batched(c))
    assert got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_device_tables_kernel_equal_reference():
    """``tables_kernel`` (device coefficients) against ``reference.group_tables``, K = 1 .. 70."""
    dev = require("triton")
    from zo_kernels import triton_kernels as tk
    rng = np.random.default_rng(0)
    for K in (1, 3, 6, 33, 70):
        c = (rng.choice([-1.0, 1.0], K) * 10.0 ** rng.uniform(-30, 38, K)).astype(np.float32)
        c[0] = -0.0
        G = -(-K // 4)
        out = torch.full((16 * G,), float("nan"), device=dev)
        tk.tables_kernel[(-(-G // 16),)](torch.from_numpy(c).to(dev), out, K, G, SUM_GROUP=4, GB=16)
        want = zref.group_tables(torch.from_numpy(c)).reshape(-1)
        assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32)), K


# ------------------------------------------------------------------------------------------------
# structure: launches, copies, host reads, plans
# ------------------------------------------------------------------------------------------------
#: torch ops that make the host wait for the device when their input lives there.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique",
            "_unique2", "item", "allclose", "nonzero_static", "repeat_interleave"}


class _Recorder(TorchDispatchMode):
    """Every torch op dispatched while active: (name, args, kwargs)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((func.overloadpacket.__name__, args, kwargs))
        return func(*args, **kwargs)


class _Launches:
    """Stands in for a Triton kernel object: counts launches and runs the real kernel with the
    recorder switched off (the interpreter copies arguments around; on a GPU that is device work).
    ``execute=False`` only counts (the structure of a 200-tensor call, without the interpreter's
    minutes; the numbers are checked by the other tests)."""

    def __init__(self, real, execute=True):
        self.real, self.count, self.execute = real, 0, execute

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count += 1
            if self.execute:
                with _disable_current_modes():
                    return self.real[grid](*args, **kwargs)
        return launch


def _storage(t):
    return t.untyped_storage().data_ptr()


class _Probe:
    """Runs a call and reports, for the memory that lives on the device (the tensors, the
    persistent buffers, the plans' tables, device seeds/coeffs), every sync op, every copy into it
    and every host read of it (item/tolist/numpy/__array__)."""

    def __init__(self, monkeypatch, device_tensors, execute=True):
        from zo_kernels import triton_kernels as tk
        self.main = _Launches(tk.apply_seeds_kernel, execute)
        self.tables = _Launches(tk.tables_kernel, execute)
        monkeypatch.setattr(tk, "apply_seeds_kernel", self.main)
        monkeypatch.setattr(tk, "tables_kernel", self.tables)
        self.device_tensors = list(device_tensors)
        self.host_reads = []
        for name in ("item", "tolist", "numpy", "__array__"):
            real = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, _name=name, **k):
                if _storage(t) in self._device_storages():
                    self.host_reads.append(_name)
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapped)

    def _device_storages(self):
        s = {_storage(t) for t in self.device_tensors}
        s |= {_storage(b) for b in _gpu._dev_buffers.values()}
        for plan in list(_gpu._plans.values()):
            s |= {_storage(d) for d, _, _ in plan._tiles.values()}
        return s

    def run(self, fn):
        launches0, tables0 = self.main.count, self.tables.count
        rec = _Recorder()
        with rec:
            fn()
        dev = self._device_storages()
        syncs, copies = [], []
        for name, args, kwargs in rec.ops:
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            if name in SYNC_OPS and any(_storage(t) in dev for t in tensors):
                syncs.append(name)
            if name == "copy_" and _storage(args[0]) in dev:
                nb = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
                copies.append(bool(nb))
            if name == "_to_copy" and _storage(args[0]) in dev:
                syncs.append("_to_copy from device")
        return {"launches": self.main.count - launches0, "table_launches": self.tables.count - tables0,
                "syncs": syncs, "copies": copies, "host_reads": list(self.host_reads)}


def test_structure_one_launch_one_copy_no_sync(monkeypatch):
    """The public call on a 200-tensor list (host seeds and coefficients): one launch, one
    non-blocking copy of the call's scalars (plus one for the plan's table on the first call with
    this list), no sync op or host read on device memory, the plan built once."""
    require("triton")
    if zo_kernels.backends()["triton"]["devices"] != ["cpu"]:
        pytest.skip("the structural probe runs the interpreter on CPU tensors; with a GPU, "
                    "test_no_sync_on_gpu checks the same with set_sync_debug_mode")
    _gpu.clear_plans()
    ts = [torch.zeros(16 * (i % 7 + 1)) for i in range(200)]
    probe = _Probe(monkeypatch, ts, execute=False)
    seeds, coeffs = make_case(3, seed=9)
    plans0 = _gpu.STATS["plans_built"]
    first = probe.run(lambda: zo_kernels.apply_seeds_(ts, seeds, coeffs, backend="triton"))
    assert first["launches"] == 1 and first["table_launches"] == 0, first
    assert first["copies"] == [True, True], first      # the plan's table, then the scalars
    for K in (1, 2, 64):
        seeds, coeffs = make_case(K, seed=10 + K)
        r = probe.run(lambda: zo_kernels.apply_seeds_(ts, seeds, coeffs, 0.999, backend="triton"))
        assert r["launches"] == 1 and r["copies"] == [True], (K, r)
        assert not r["syncs"] and not r["host_reads"], (K, r)
    assert not first["syncs"] and not first["host_reads"], first
    assert _gpu.STATS["plans_built"] == plans0 + 1
    # The probe sees a violation when there is one (guard against a probe that cannot fail).
    bad = probe.run(lambda: ts[0][3].item())
    assert bad["syncs"] == ["_local_scalar_dense"] and bad["host_reads"][-1:] == ["item"]
    bad = probe.run(lambda: ts[1].tolist())
    assert bad["host_reads"][-1:] == ["tolist"]


def test_structure_device_scalars_no_copy(monkeypatch):
    """Seeds and coefficients already on the device (as in a captured CUDA graph): no staging copy,
    the tables built on the device (one ``tables_kernel`` launch), one main launch, no host read of
    the seeds or coefficients; the results are the bits of the host path."""
    dev = require("triton")
    if dev != "cpu":
        pytest.skip("interpreter-only probe; with a GPU see test_no_sync_on_gpu")
    ts = make_tensors([(4096,), (48,), (129,)], torch.float32, seed=11)
    seeds, coeffs = make_case(9, seed=12)
    s_t = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64)
    c_t = torch.tensor(coeffs, dtype=torch.float32)
    xs = [t.clone() for t in ts]
    probe = _Probe(monkeypatch, xs + [s_t, c_t])
    bases = zo_kernels.offsets(xs)
    _gpu.run_triton(xs, s_t, c_t, bases, 0.999, "rademacher", scalars_on_device=True)  # warm plan
    xs2 = [t.clone() for t in ts]
    probe.device_tensors += xs2
    _gpu.run_triton(xs2, s_t, c_t, bases, 0.999, "rademacher", scalars_on_device=True)
    r = probe.run(lambda: _gpu.run_triton(xs2, s_t, c_t, bases, 0.999, "rademacher",
                                          scalars_on_device=True))
    assert r["launches"] == 1 and r["table_launches"] == 1, r
    assert r["copies"] == [] and not r["syncs"] and not r["host_reads"], r
    want = [t.clone() for t in ts]
    zo_kernels.apply_seeds_(want, seeds, coeffs, 0.999, backend="cpu")
    for x, w in zip(xs, want):
        assert_bits_equal(x, w, "device scalars")


def test_plan_cache_keys():
    """A plan is reused for the same tensors, rebuilt when a tensor's storage, size or dtype or the
    offset changes (so a stale descriptor table is never used)."""
    _gpu.clear_plans()
    a, b = torch.zeros(256), torch.zeros(100)
    p1 = _gpu.plan_for([a, b], [0, 256])
    assert _gpu.plan_for([a, b], [0, 256]) is p1
    assert _gpu.plan_for([a.detach(), b.detach()], [0, 256]) is p1   # same memory, new objects
    assert _gpu.plan_for([a, b], [128, 384]) is not p1               # other offset
    c = torch.zeros(256)
    assert _gpu.plan_for([c, b], [0, 256]) is not p1                 # other storage
    assert _gpu.plan_for([a[:128], b], [0, 128]) is not p1           # other size
    assert _gpu.plan_for([a.view(torch.int32).view(torch.float32), b], [0, 256]) is p1
    assert _gpu.plan_for([a.to(torch.bfloat16), b], [0, 256]) is not p1
    p = _gpu.plan_for([a, b.to(torch.float16)], [0, 256])
    assert p.dtype_code == -1 and p1.dtype_code == 0
    assert p1.aligned is False                                       # numel 100 % 16 != 0
    desc, tiles, n = p1.tiles(32)
    assert desc.tolist() == [a.data_ptr(), 256, 0, 0, b.data_ptr(), 100, 256, 0]
    assert tiles.tolist() == [0, 1, 2] and n == 2


def test_device_guard_uses_the_tensors_device(monkeypatch):
    """Launches happen inside ``device_guard(tensors' device)`` (on a GPU: ``torch.cuda.device``,
    so a tensor on a non-current GPU is updated from its own device and stream)."""
    require("triton")
    seen = []
    real = _gpu.device_guard
    monkeypatch.setattr(_gpu, "device_guard", lambda d: (seen.append(d), real(d))[1])
    t = torch.zeros(16)
    zo_kernels.apply_seeds_([t], [1], [1.0], backend="triton")
    assert seen == [t.device]
    g = real(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1


def test_scalars_on_another_device_rejected():
    """Seeds/coeffs on a device other than the tensors' (checked from metadata, no sync)."""
    with pytest.raises(ValueError, match="seeds is on meta"):
        _gpu.check_scalars_device(torch.empty(3, dtype=torch.int64, device="meta"),
                                  torch.empty(3), torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# with a GPU
# ------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_sync_on_gpu(backend):
    """``set_sync_debug_mode("error")`` makes any synchronizing CUDA call raise: warm calls with
    host seeds/coeffs and with device seeds/coeffs must not raise."""
    require(backend)
    ts = [torch.zeros(16 * (i % 7 + 1), device="cuda") for i in range(200)]
    seeds, coeffs = make_case(8, seed=13)
    s_t = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], device="cuda")
    c_t = torch.tensor(coeffs, device="cuda")
    zo_kernels.apply_seeds_(ts, seeds, coeffs, backend=backend)       # builds the plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        zo_kernels.apply_seeds_(ts, seeds, coeffs, 0.999, backend=backend)
        zo_kernels.apply_seeds_(ts, s_t, c_t, 0.999, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    """A call with device seeds/coeffs captured in a CUDA graph replays bit-identically to eager
    calls after new values are copied into the static seeds/coeffs."""
    require(backend)
    ts = make_tensors([(4096,), (129,)], torch.float32, seed=14)
    x_graph = [t.cuda() for t in ts]
    seeds, coeffs = make_case(5, seed=15)
    s_t = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], device="cuda")
    c_t = torch.tensor(coeffs, device="cuda")
    zo_kernels.apply_seeds_(x_graph, s_t, c_t, 1.0, backend=backend)   # warm-up: plan, compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        zo_kernels.apply_seeds_(x_graph, s_t, c_t, 1.0, backend=backend)
    x_eager = [x.clone() for x in x_graph]
    seeds2, coeffs2 = make_case(5, seed=16)
    s_t.copy_(torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds2]))
    c_t.copy_(torch.tensor(coeffs2))
    g.replay()
    zo_kernels.apply_seeds_(x_eager, seeds2, coeffs2, 1.0, backend=backend)
    torch.cuda.synchronize()
    for a, b in zip(x_graph, x_eager):
        assert_bits_equal(a, b, "graph replay")


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_plan_reused_on_a_side_stream(backend):
    """A plan built on the default stream, used at once on a side stream: the side stream waits
    for the table's copy (an event, no host wait); two updates equal two reference updates."""
    require(backend)
    from zo_kernels import _gpu as g
    g.clear_plans()
    ts = make_tensors([(4096,), (129,)], torch.float32, seed=19)
    seeds, coeffs = make_case(6, seed=20)
    xs = [t.cuda() for t in ts]
    zo_kernels.apply_seeds_(xs, seeds, coeffs, 0.999, backend=backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        zo_kernels.apply_seeds_(xs, seeds, coeffs, 0.999, backend=backend)
    side.synchronize()
    want = expected(expected(ts, seeds, coeffs, 0.999), seeds, coeffs, 0.999)
    for x, w in zip(xs, want):
        assert_bits_equal(x, w, "side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensor_on_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: updated correctly, on cuda:1's stream."""
    require(backend)
    ts = make_tensors([(4096,), (129,)], torch.float32, seed=17)
    seeds, coeffs = make_case(6, seed=18)
    xs = [t.to("cuda:1") for t in ts]
    with torch.cuda.device(0):
        zo_kernels.apply_seeds_(xs, seeds, coeffs, 0.999, backend=backend)
    torch.cuda.synchronize(1)
    for x, w in zip(xs, expected(ts, seeds, coeffs, 0.999)):
        assert_bits_equal(x, w, "cuda:1")


# ------------------------------------------------------------------------------------------------
# compilation (no GPU needed)
# ------------------------------------------------------------------------------------------------
_AOT = textwrap.dedent("""
    import json, re, sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zo_kernels import triton_kernels as tk
    sig = {"desc_ptr": "*i64", "tile_ptr": "*i64", "T": "i32", "seeds_ptr": "*i64",
           "coeffs_ptr": "*fp32", "tables_ptr": "*fp32", "K": "i32", "G": "i32", "decay": "fp32"}
    out = {}
    for name, dtype, aligned in [("f32_aligned", 0, True), ("f32_unaligned", 0, False),
                                 ("bf16_aligned", 1, True), ("mixed_aligned", -1, True)]:
        ce = dict(LOG_T=8, DTYPE=dtype, ALIGNED=aligned, APPLY_DECAY=True, GAUSSIAN=False, GS=4,
                  NB=tk.NB_RADEMACHER, SUM_GROUP=4)
        s = dict(sig); s.update({k: "constexpr" for k in ce})
        c = triton.compile(ASTSource(fn=tk.apply_seeds_kernel, signature=s, constexprs=ce),
                           target=GPUTarget("cuda", int(sys.argv[1]), 32),
                           options={"num_warps": tk.NUM_WARPS, "enable_fp_fusion": False})
        ptx = c.asm["ptx"]
        out[name] = {"ld_v4": len(re.findall(r"ld\\.global\\.v4", ptx)),
                     "st_v4": len(re.findall(r"st\\.global\\.v4", ptx)),
                     "mulhi": len(re.findall(r"mul\\.hi\\.u32", ptx)),
                     "fma": len(re.findall(r"\\bfma\\.rn\\.f32", ptx)),
                     "cubin": len(c.asm["cubin"])}
    print(json.dumps(out))
""")


def _triton_cuda_compiler_ok():
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _triton_cuda_compiler_ok(), reason="Triton's NVIDIA backend is missing")
@pytest.mark.parametrize("arch", [90])
def test_triton_kernel_compiles_for_gpu(arch):
    """Compiled ahead of time for sm_90 (no GPU needed; a subprocess without TRITON_INTERPRET):
    the aligned specializations use 128-bit loads and stores (fp32: 32 elements per thread = 8
    vectors; bf16: 4), the unaligned one none; Philox runs once per thread per group (20 mul.hi =
    10 rounds x 2, not once per element); no fused multiply-add."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT, str(arch)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["f32_aligned"]["ld_v4"] >= 8 and r["f32_aligned"]["st_v4"] >= 8, r
    assert r["bf16_aligned"]["ld_v4"] >= 4 and r["bf16_aligned"]["st_v4"] >= 4, r
    assert r["mixed_aligned"]["ld_v4"] > 0, r
    assert r["f32_unaligned"]["ld_v4"] == 0 and r["f32_unaligned"]["st_v4"] == 0, r
    for v in r.values():
        assert v["mulhi"] == 20, r
        assert v["fma"] == 0 and v["cubin"] > 0, r


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine")
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build (no CUDA headers)")
def test_cuda_kernel_compiles_vectorized(tmp_path):
    """nvcc compiles csrc/cuda/apply_seeds_cuda.cu for sm_90: 128-bit streaming loads and stores
    (ld/st.global.cs.v4: fp32 4 per thread, bf16 and fp16 2 each, Rademacher and Gaussian), and
    ptxas reports no register spills for the Rademacher kernel."""
    from torch.utils import cpp_extension
    import sysconfig
    nvcc = _nvcc()
    ptx = tmp_path / "k.ptx"
    inc = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    cmd = [nvcc, "-std=c++20", "-O3", "--fmad=false", "-arch=sm_90", "-ptx", "-o", str(ptx),
           os.path.join(ROOT, "csrc/cuda/apply_seeds_cuda.cu"), *inc,
           f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(ROOT, 'csrc')}",
           "-DTORCH_EXTENSION_NAME=_C_cuda", "-diag-suppress", "20013,20015,3189"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = ptx.read_text()
    assert len(re.findall(r"ld\.global\.cs\.v4", text)) == 16
    assert len(re.findall(r"st\.global\.cs\.v4", text)) == 16
    ptxas = os.path.join(os.path.dirname(nvcc), "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("ptxas not found beside nvcc")
    res = subprocess.run([ptxas, "-arch=sm_90", "-v", str(ptx), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = res.stderr + res.stdout
    # The Rademacher instantiation (template argument false: ILb0E) has no spills.
    block = info.split("ILb0E", 2)[-1].split("Compiling", 1)[0]
    assert "0 bytes spill stores" in block and "0 bytes spill loads" in block, info
