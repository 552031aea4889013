"""``apply_seeds_`` / ``perturb_`` (docs/DESIGN.md, Grouped summation order) against the numpy fp32
reference, per backend, and for the C++ backend per CPU path (avx512, avx2, portable: every path this
machine executes, see ``_cpu_paths``).

float32: bit-exact (Rademacher: acc summed in the contract's grouped order -- subset-sum tables over
groups of 4 seeds, added group by group; Gaussian: in seed order; the decay multiply rounded on its
own). bfloat16 and float16: the fp32 result rounded once to the dtype, bit-exact. Gaussian: within
float32 tolerance.
Also: thread-count independence (OMP_NUM_THREADS in fresh subprocesses, ``torch.set_num_threads``
in process), and updating one tensor alone at its offset equals its slice of the whole-list update.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import _philox_np as ref
import zo_kernels
from _cpu_paths import CpuPath, backend_params, restore_cpu_path, select  # noqa: F401 (fixture)

#: Backends as test parameters; "cpu" is expanded into one parameter per CPU path.
BACKENDS = backend_params(("reference", "cpu", "triton", "cuda"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1,), (127,), (3, 43), (129,), (2, 3, 5, 7), (4097,)]
#: Smaller list for the Triton interpreter (slow): still odd sizes and several blocks.
SHAPES_TRITON = [(1,), (127,), (3, 43), (129,), (2, 3, 5, 7)]
#: Triton with K = 64: the interpreter's cost is per launch (one per tensor) times K, so fewer.
SHAPES_TRITON_K64 = [(1,), (2, 3, 5, 7)]


def require(backend: str) -> str:
    """The device to test ``backend`` on, or skip the calling test (only it) with the reason.

    reference and cpu run on CPU tensors; triton on CUDA tensors when a GPU is present, else on CPU
    tensors through the interpreter; cuda only on CUDA tensors. Inputs are built on the CPU and the
    results are compared there. For the C++ backend, selects the parameter's CPU path (or skips).
    """
    select(backend)
    info = zo_kernels.backends()[backend]
    devices = info["devices"] if info["usable"] else []
    order = ("cuda", "cpu") if backend in ("triton", "cuda") else ("cpu",)
    for dev in order:
        if dev in devices:
            return dev
    pytest.skip(f"backend {backend!r} not usable here: "
                f"{info['why'] or 'devices=' + str(info['devices'])}")


def make_case(K: int, seed: int = 0):
    """K seeds (about half >= 2**63) and K float coefficients of mixed sign and magnitude.

    Mixed magnitudes (1e-4 .. 1) make the fp32 sum order-dependent, so a backend that reassociates
    the accumulation or fuses the decay multiply into the add shows up as a bit difference.
    """
    rng = np.random.default_rng(seed)
    seeds = [int(x) for x in rng.integers(0, 2**63, size=K, dtype=np.int64)]
    seeds = [s + 2**63 if k % 2 else s for k, s in enumerate(seeds)]
    if K >= 7:
        seeds[1], seeds[2] = 2**64 - 1, 0
    coeffs = (rng.choice([-1.0, 1.0], K) * 10.0 ** rng.uniform(-4, 0, K)).tolist()
    return seeds, coeffs


def make_tensors(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def expected(ts, seeds, coeffs, decay, dist="rademacher", start=0):
    """numpy fp32 result for each tensor, rounded once to the tensor's dtype."""
    vals = [t.detach().float().cpu().reshape(-1).numpy() for t in ts]
    out = ref.apply_seeds_fp32(vals, seeds, coeffs, decay, dist, start)
    return [torch.from_numpy(o).reshape(t.shape).to(t.dtype) for o, t in zip(out, ts)]


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str):
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if not torch.equal(got, want):
        bad = (got != want).reshape(-1).nonzero().flatten()
        i = int(bad[0])
        g, w = got.reshape(-1)[i].item(), want.reshape(-1)[i].item()
        raise AssertionError(f"{what}: {bad.numel()} of {got.numel()} elements differ; "
                             f"first at {i}: got {g!r}, want {w!r}")


@pytest.mark.parametrize("K", [7, 64])
def test_case_is_order_sensitive(K):
    """Guard on the test data: summing the seeds in any order other than the contract's grouped
    order (groups of 4 seeds through subset-sum tables, groups in order) gives different fp32 bits,
    and so does fusing ``p * decay + acc``; so the bit-exact tests below (K = 7 and 64) catch a
    backend that uses the plain seed order, another group size, another group order or reversed
    seeds."""
    assert ref.SUM_GROUP == zo_kernels.SUM_GROUP == 4
    seeds, coeffs = make_case(K, seed=K)
    p = make_tensors([(4097,)], torch.float32)[0].numpy()
    want = ref.apply_seeds_fp32([p], seeds, coeffs, 0.999)[0]
    wrong_orders = {
        "seed order (group 1)": dict(group=1),
        "groups of 2": dict(group=2),
        "groups of 3": dict(group=3),
        "groups of 5": dict(group=5),
        "groups of 8": dict(group=8),
        "groups of 4, reversed": dict(reverse_groups=True),
    }
    same_number = {"groups of 8": K <= 8, "groups of 5": K <= 5,  # one group: the seed order
                   "groups of 4, reversed": K <= 8}  # two groups: (0 + T0) + T1 == (0 + T1) + T0
    for name, kw in wrong_orders.items():
        if same_number.get(name, False):
            continue
        other = ref.apply_seeds_fp32([p], seeds, coeffs, 0.999, **kw)[0]
        assert (other != want).any(), f"K={K}: the data cannot tell the grouped order from {name}"
    rev = ref.apply_seeds_fp32([p], seeds[::-1], coeffs[::-1], 0.999)[0]
    assert (rev != want).any()
    acc = ref.apply_seeds_fp32([np.zeros_like(p)], seeds, coeffs)[0]
    fused = (p.astype(np.float64) * np.float64(np.float32(0.999)) + acc).astype(np.float32)
    assert (want != fused).any()


@pytest.mark.parametrize("K", range(0, 6))
def test_grouped_order_equals_seed_order_up_to_k5(K):
    """A property of the contract (numpy only): with at most one full group plus one single seed,
    no add is reassociated, so the grouped sum is the seed-order sum (``perturb_`` is unchanged)."""
    seeds, coeffs = make_case(K, seed=100 + K)
    if K >= 3:
        coeffs[1] = 0.0
    p = make_tensors([(1000,)], torch.float32, seed=K)[0].numpy()
    a = ref.apply_seeds_fp32([p], seeds, coeffs, 0.999, start=2**32 - 7)[0]
    b = ref.apply_seeds_fp32([p], seeds, coeffs, 0.999, start=2**32 - 7, group=1)[0]
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


#: Magnitudes for the small-K tests: large, small and sub-ulp terms interleaved, so that for K >= 6
#: re-associating the sum (the seed order, for one) changes the float32 bits of some elements.
_MAGS = (3.0, 1e-3, 0.7, 2e-5, 0.4, 1.3e-7, 5e-2, 9e-8, 1.7)


def _mixed_coeffs(K: int, zero_at: int | None, seed: int) -> list[float]:
    """K coefficients of random sign and mixed magnitude (``_MAGS``, cycled and rescaled), one of
    them 0 when ``zero_at`` is given."""
    rng = np.random.default_rng(seed)
    mags = [_MAGS[k % len(_MAGS)] * 3.0 ** (k // len(_MAGS)) for k in range(K)]
    c = (rng.choice([-1.0, 1.0], K) * np.array(mags)).tolist()
    if zero_at is not None:
        c[zero_at] = 0.0
    return c


def test_group_tables_match_numpy_scalars():
    """``reference.group_tables`` equals tables built from numpy.float32 scalars one add at a time,
    short last group included (its unused entries repeat the used ones: ``T[m & (2**n - 1)]``)."""
    from zo_kernels.reference import group_tables

    for K in (0, 1, 2, 3, 4, 5, 7, 8, 9, 13):
        for zero_at in (None, K // 2):
            if K == 0 and zero_at is not None:
                continue
            coeffs = _mixed_coeffs(K, zero_at, seed=K)
            got = group_tables(coeffs)
            assert got.dtype == torch.float32 and got.device.type == "cpu"
            assert tuple(got.shape) == (-(-K // 4), 16)
            for g in range(got.shape[0]):
                cs = [np.float32(c) for c in coeffs[4 * g: 4 * g + 4]]
                table = ref.subset_sum_table(cs)
                want = np.array([table[m & (len(table) - 1)] for m in range(16)], dtype=np.float32)
                np.testing.assert_array_equal(got[g].numpy().view(np.uint32), want.view(np.uint32),
                                              err_msg=f"K={K} group {g}")
            # tensor input gives the same tables
            assert torch.equal(group_tables(torch.tensor(coeffs, dtype=torch.float32)), got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", range(1, 10))
def test_grouped_order_small_k_bit_exact(backend, K):
    """K = 1..9 (full and short last groups, one and several groups) with coefficients of mixed
    magnitude, with and without a zero coefficient: every backend equals the numpy implementation
    bit for bit, on float32 and bfloat16, with and without decay."""
    dev = require(backend)
    rng = np.random.default_rng(K)
    seeds = [int(x) for x in rng.integers(0, 2**63, size=K, dtype=np.int64)]
    seeds[0] = 2**64 - 1 - seeds[0]
    shapes = [(1,), (129,), (3, 43), (300,)]
    for zero_at in (None, (K - 1) // 2):
        coeffs = _mixed_coeffs(K, zero_at, seed=10 + K)
        for dtype, decay in ((torch.float32, 0.999), (torch.float32, 1.0), (torch.bfloat16, 0.5)):
            ts = make_tensors(shapes, dtype, seed=K)
            start = 2**32 - 100
            want = expected(ts, seeds, coeffs, decay, start=start)
            if K >= 6 and dtype == torch.float32:  # guard: the data tells the orders apart
                vals = [t.reshape(-1).numpy() for t in ts]
                seq = ref.apply_seeds_fp32(vals, seeds, coeffs, decay, start=start, group=1)
                assert any((a.reshape(-1).numpy() != b).any() for a, b in zip(want, seq)), \
                    f"K={K}: test data cannot tell the grouped order from the seed order"
            ts = [t.to(dev) for t in ts]
            zo_kernels.apply_seeds_(ts, seeds, coeffs, decay=decay, backend=backend, offset=start)
            for k, (t, w) in enumerate(zip(ts, want)):
                assert_bits_equal(t, w, f"{backend} K={K} zero_at={zero_at} {dtype} "
                                        f"decay={decay} tensor {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 7, 15, 16, 33, 63, 64, 65])
@pytest.mark.parametrize("decay", [1.0, 0.999])
def test_apply_seeds_rademacher_bit_exact(backend, dtype, K, decay):
    """K = 15 / 16 straddle the avx2 path's switch from direct sums to tables; 63 / 65 a partial
    seed vector and a second seed batch (64 seeds per batch)."""
    if backend == "triton" and K not in (1, 7, 64):
        pytest.skip("the Triton interpreter is slow; K = 1, 7, 64 cover its kernel")
    dev = require(backend)
    shapes = SHAPES
    if backend == "triton":
        shapes = SHAPES_TRITON_K64 if K == 64 else SHAPES_TRITON
    seeds, coeffs = make_case(K, seed=K)
    ts = make_tensors(shapes, dtype, seed=K + 1)
    want = expected(ts, seeds, coeffs, decay)
    ts = [t.to(dev) for t in ts]
    zo_kernels.apply_seeds_(ts, seeds, coeffs, decay=decay, backend=backend)
    for k, (t, w) in enumerate(zip(ts, want)):
        assert_bits_equal(t, w, f"{backend} {dtype} K={K} decay={decay} tensor {k} "
                                f"{tuple(t.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_seeds_high_offset_and_tensor_inputs(backend):
    """Offsets past 2**32 / 2**39, seeds and coeffs given as int64 / float32 tensors."""
    dev = require(backend)
    seeds, coeffs = make_case(7, seed=3)
    for start in (2**32 + 5, 2**39 - 300, 2**40 + 77):
        ts = make_tensors(SHAPES_TRITON, torch.float32, seed=5)
        want = expected(ts, seeds, coeffs, 0.5, start=start)
        ts = [t.to(dev) for t in ts]
        seeds_t = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64)
        coeffs_t = torch.tensor(coeffs, dtype=torch.float32)
        zo_kernels.apply_seeds_(ts, seeds_t, coeffs_t, decay=0.5, backend=backend, offset=start)
        for t, w in zip(ts, want):
            assert_bits_equal(t, w, f"{backend} offset={start}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_0d_tensors_in_one_list(backend):
    """One call over float32, bfloat16, float16 and 0-d tensors: each tensor gets its own dtype's
    rounding of the shared fp32 arithmetic, at its own offset."""
    dev = require(backend)
    seeds, coeffs = make_case(7, seed=13)
    ts = [torch.randn(()), torch.randn(130).bfloat16(), torch.randn(3, 3).half(),
          torch.randn(()).bfloat16(), torch.randn(257)]
    want = expected(ts, seeds, coeffs, 0.999, start=77)
    ts = [t.to(dev) for t in ts]
    zo_kernels.apply_seeds_(ts, seeds, coeffs, decay=0.999, backend=backend, offset=77)
    for k, (t, w) in enumerate(zip(ts, want)):
        assert_bits_equal(t, w, f"{backend} mixed list tensor {k} {t.dtype} {tuple(t.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_writes_stay_inside_each_view(backend, dtype):
    """Views into one buffer at odd storage offsets: elements between and around them (which a
    block-wide store or a vector tail could hit) keep their bits; the views get the reference."""
    dev = require(backend)
    before = torch.randn(700).to(dtype)
    buf = before.to(dev, copy=True)
    views = [buf[3:4], buf[10:139], buf[141:141 + 3 * 43].view(3, 43), buf[300:557]]
    inside = torch.zeros(700, dtype=torch.bool)
    for lo, hi in ((3, 4), (10, 139), (141, 270), (300, 557)):
        inside[lo:hi] = True
    seeds, coeffs = make_case(7, seed=51)
    want = expected(views, seeds, coeffs, 0.999, start=2**32 + 3)
    zo_kernels.apply_seeds_(views, seeds, coeffs, 0.999, backend=backend, offset=2**32 + 3)
    assert_bits_equal(buf.cpu()[~inside], before[~inside], "memory outside the views")
    for k, (v, w) in enumerate(zip(views, want)):
        assert_bits_equal(v, w, f"view {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_requiring_grad_are_updated_in_place(backend):
    """nn.Parameter leaves (requires_grad=True) are updated in place under no_grad (as torch's
    in-place ops require), storage kept, no autograd history recorded, version counters bumped."""
    if backend == "triton":
        pytest.skip("covered by the other Triton tests; the interpreter is slow")
    dev = require(backend)
    lin = torch.nn.Linear(13, 7).to(dev)
    params = list(lin.parameters())
    ptrs = [p.data_ptr() for p in params]
    want = expected([p.detach() for p in params], [5, 2**63], [0.25, -0.5], 1.0)
    with torch.no_grad():
        zo_kernels.apply_seeds_(params, [5, 2**63], [0.25, -0.5], backend=backend)
    for p, w, ptr in zip(params, want, ptrs):
        assert p.requires_grad and p.grad_fn is None and p.data_ptr() == ptr and p._version > 0
        assert_bits_equal(p.detach(), w, "parameter")


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_equals_apply_seeds_k1(backend):
    dev = require(backend)
    a = [t.to(dev) for t in make_tensors(SHAPES_TRITON, torch.float32, seed=9)]
    b = [t.clone() for t in a]
    want = expected(a, [2**63 + 3], [-0.375], 1.0)
    zo_kernels.perturb_(a, 2**63 + 3, -0.375, backend=backend)
    zo_kernels.apply_seeds_(b, [2**63 + 3], [-0.375], backend=backend)
    for x, y, w in zip(a, b, want):
        assert_bits_equal(x, w, "perturb_")
        assert_bits_equal(y, w, "apply_seeds_")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decay_only_with_no_seeds(backend):
    """K = 0 with decay != 1 multiplies by float32(decay) and nothing else."""
    dev = require(backend)
    ts = [t.to(dev) for t in make_tensors(SHAPES_TRITON, torch.float32, seed=2)]
    want = expected(ts, [], [], 0.9)
    zo_kernels.apply_seeds_(ts, [], [], decay=0.9, backend=backend)
    for t, w in zip(ts, want):
        assert_bits_equal(t, w, "decay only")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_tensor_alone_at_its_offset_equals_slice(backend, dtype):
    """Updating tensor k alone with ``offset=offsets(all)[k]`` equals its part of the whole
    update."""
    dev = require(backend)
    shapes = SHAPES_TRITON if backend == "triton" else SHAPES
    seeds, coeffs = make_case(7, seed=11)
    whole = [t.to(dev) for t in make_tensors(shapes, dtype, seed=12)]
    parts = [t.clone() for t in whole]
    start = 2**32 + 1
    zo_kernels.apply_seeds_(whole, seeds, coeffs, decay=0.999, backend=backend, offset=start)
    offs = zo_kernels.offsets(parts, start)
    for k in reversed(range(len(parts))):  # any order: tensors are independent
        zo_kernels.apply_seeds_([parts[k]], seeds, coeffs, decay=0.999, backend=backend,
                                offset=offs[k])
    for k, (a, b) in enumerate(zip(whole, parts)):
        assert_bits_equal(b, a, f"tensor {k} alone vs in the list")


def test_offsets_function():
    ts = [torch.empty(s) for s in [(1,), (128,), (129,), (0,), (3, 50), (256,)]]
    assert zo_kernels.offsets(ts) == [0, 128, 256, 512, 512, 768]
    assert zo_kernels.offsets(ts, 2**40) == [2**40 + o for o in zo_kernels.offsets(ts)]
    assert zo_kernels.offsets([]) == []


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_agree_with_each_other(backend):
    """Direct cross-check against the reference backend (on CPU) on a larger odd tensor list (the
    reference is the baseline, so it is not a parameter: comparing it with itself tests nothing)."""
    dev = require(backend)
    shapes = SHAPES_TRITON if backend == "triton" else SHAPES + [(50, 77)]
    seeds, coeffs = make_case(7, seed=21)
    a = make_tensors(shapes, torch.float32, seed=22)
    b = [t.to(dev, copy=True) for t in a]
    zo_kernels.apply_seeds_(a, seeds, coeffs, 0.999, backend="reference")
    zo_kernels.apply_seeds_(b, seeds, coeffs, 0.999, backend=backend)
    for x, y in zip(a, b):
        assert_bits_equal(y, x, f"{backend} vs reference")


# ------------------------------------------------------------------------------------------------
# Gaussian
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 7])
def test_apply_seeds_gaussian(backend, K):
    """Within fp32 tolerance of numpy: each z within a few ulp, so the error of p is bounded by
    ~2e-6 * sum|c_k| plus a couple of ulp of the result."""
    dev = require(backend)
    seeds, coeffs = make_case(K, seed=31 + K)
    ts = make_tensors(SHAPES_TRITON, torch.float32, seed=32)
    start = 2**32 - 200
    want = expected(ts, seeds, coeffs, 0.999, "gaussian", start)
    ts = [t.to(dev) for t in ts]
    zo_kernels.apply_seeds_(ts, seeds, coeffs, 0.999, dist="gaussian", backend=backend,
                            offset=start)
    atol = 2e-6 * float(np.abs(np.float32(coeffs)).sum()) + 1e-6
    for t, w in zip(ts, want):
        torch.testing.assert_close(t.cpu(), w, rtol=1e-6, atol=atol)


# ------------------------------------------------------------------------------------------------
# thread-count independence
# ------------------------------------------------------------------------------------------------
_THREAD_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, warnings
    warnings.simplefilter("ignore")
    import torch, zo_kernels
    backend = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) for n in (1 << 19, 1001, (1 << 19) + 77)]
    seeds = [(2**63 + 7919 * k) % 2**64 for k in range(8)]
    coeffs = [(-1) ** k * 10.0 ** (-k / 2) for k in range(8)]
    zo_kernels.apply_seeds_(ts, seeds, coeffs, decay=0.999, backend=backend)
    h = hashlib.sha256()
    for t in ts:
        h.update(t.numpy().tobytes())
    print(json.dumps({"threads": torch.get_num_threads(), "sha": h.hexdigest()}))
""")


def _run_with_threads(backend: str, n: int, isa: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n), ZO_KERNELS_ISA=isa,
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("ZO_KERNELS_NO_AVX512", None)
    proc = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT, backend], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", backend_params(["cpu"]))
def test_omp_num_threads_1_and_2_identical_bits(backend):
    """Fresh processes with OMP_NUM_THREADS=1 and 2 (and ZO_KERNELS_ISA = the path) produce the same
    bytes, which are the reference's (C++ CPU backend, per path)."""
    require(backend)
    one = _run_with_threads("cpu", 1, backend.path)
    two = _run_with_threads("cpu", 2, backend.path)
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["sha"] == two["sha"]
    if backend.path == "avx512":  # once: the bytes are the reference's
        assert _run_with_threads("reference", 1)["sha"] == one["sha"]


@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_set_num_threads_identical_bits(backend):
    assert require(backend) == "cpu"
    n = (1 << 18) + 77 if backend == "cpu" else 20011
    seeds, coeffs = make_case(8, seed=41)
    base = make_tensors([(n,), (1001,)], torch.float32, seed=42)
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ts = [t.clone() for t in base]
            zo_kernels.apply_seeds_(ts, seeds, coeffs, decay=0.999, backend=backend)
            results.append(hashlib.sha256(b"".join(t.numpy().tobytes() for t in ts)).hexdigest())
    finally:
        torch.set_num_threads(prev)
    assert results[0] == results[1]
    want = expected(base, seeds, coeffs, 0.999)
    assert results[0] == hashlib.sha256(b"".join(w.numpy().tobytes() for w in want)).hexdigest()
