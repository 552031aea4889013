"""The C++ backend's CPU paths (avx512, avx2, portable) and its fast entry.

- Every path this CPU runs against the numpy reference on tensors long enough to cross work chunks
  (32768 elements) and 16-block groups, at offsets that cut blocks, for K on both sides of the avx2
  path's direct/table switch and past one seed batch.
- Path selection: ``ZO_KERNELS_ISA`` (fresh processes), ``set_cpu_path``, and their errors.
- The fast entry ``_C.apply_seeds_fast`` takes the plain call and refuses (returns False, touches
  nothing) everything the general path must see; both give the same bits.
- Autograd: every backend bumps the version counters like torch's in-place ops.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import _philox_np as ref
import zo_kernels
from _cpu_paths import PATHS, backend_params, restore_cpu_path, select  # noqa: F401 (fixture)
from zo_kernels import _backends

CPU_PATH_PARAMS = backend_params(["cpu"])


def _expected(ts, seeds, coeffs, decay, start):
    vals = [t.float().reshape(-1).numpy() for t in ts]
    out = ref.apply_seeds_fp32(vals, seeds, coeffs, decay, "rademacher", start)
    return [torch.from_numpy(o).reshape(t.shape).to(t.dtype) for o, t in zip(out, ts)]


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("backend", CPU_PATH_PARAMS)
@pytest.mark.parametrize("K", [1, 2, 5, 15, 16, 65])
def test_paths_long_tensors_unaligned(backend, K):
    select(backend)
    rng = np.random.default_rng(K)
    seeds = [int(s) for s in rng.integers(0, 2**63, K, dtype=np.int64)]
    seeds[0] = 2**64 - 1
    coeffs = (rng.choice([-1.0, 1.0], K) * 10.0 ** rng.uniform(-4, 0, K)).tolist()
    g = torch.Generator().manual_seed(K)
    ts = [torch.randn(70001, generator=g), torch.randn(33000, generator=g).half(),
          torch.randn(40000, generator=g).bfloat16(), torch.randn(300, generator=g)]
    start = 2**33 + 77  # cuts the first block: head, full blocks, tail on every tensor
    want = _expected(ts, seeds, coeffs, 0.999, start)
    zo_kernels.apply_seeds_(ts, seeds, coeffs, decay=0.999, backend=backend, offset=start)
    for k, (t, w) in enumerate(zip(ts, want)):
        assert torch.equal(_bits(t), _bits(w)), \
            f"{backend.path} K={K} tensor {k}: {int((t != w).sum())} elements differ"


@pytest.mark.parametrize("backend", CPU_PATH_PARAMS)
@pytest.mark.parametrize("K", [1, 2, 7, 16, 20, 70])
def test_paths_block_counter_high_word(backend, K):
    """Blocks around 2**32 (global index 2**39): the counter's high word changes inside a 16-block
    group, where the avx2 Philox cannot share round 2's seed part across the group; float32 and
    bfloat16, direct and table K."""
    select(backend)
    rng = np.random.default_rng(100 + K)
    seeds = [int(s) for s in rng.integers(0, 2**63, K, dtype=np.int64)]
    seeds[-1] = 2**64 - 2
    coeffs = (rng.choice([-1.0, 1.0], K) * 10.0 ** rng.uniform(-3, 0, K)).tolist()
    g = torch.Generator().manual_seed(K)
    ts = [torch.randn(128 * 40 + 3, generator=g), torch.randn(128 * 20, generator=g).bfloat16()]
    start = 2**39 - 128 * 9 - 5
    want = _expected(ts, seeds, coeffs, 1.0, start)
    zo_kernels.apply_seeds_(ts, seeds, coeffs, backend=backend, offset=start)
    for k, (t, w) in enumerate(zip(ts, want)):
        assert torch.equal(_bits(t), _bits(w)), \
            f"{backend.path} K={K} tensor {k}: {int((t != w).sum())} elements differ"


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("backend", CPU_PATH_PARAMS)
def test_paths_equal_leading_seeds(backend):
    """Equal seeds in one group (two terms along the same direction): same bits as the reference,
    including c_1 = -c_0, signed zeros and an fp32 overflow of c_0 + c_1; float32 and bfloat16, with
    and without decay."""
    select(backend)
    g = torch.Generator().manual_seed(3)
    cases = [([7, 7], [0.25, 0.5]), ([7, 7], [0.25, -0.25]), ([7, 7], [-0.0, 0.0]),
             ([7, 7], [-0.0, -0.0]), ([2**64 - 1] * 2, [3e38, 3e38]), ([9, 9, 4], [1e-3, 2.5e-3, 1.0]),
             ([9, 9, 4, 9], [0.5, -0.5, 1e-4, 3.0]), ([5, 5, 5, 5], [1.0, 2.0, 3.0, 4.0])]
    for seeds, coeffs in cases:
        for dt in (torch.float32, torch.bfloat16):
            for decay in (1.0, 0.75):
                ts = [torch.randn(128 * 20 + 7, generator=g).to(dt), torch.zeros(300, dtype=dt)]
                want = _expected(ts, seeds, coeffs, decay, 5)
                zo_kernels.apply_seeds_(ts, seeds, coeffs, decay=decay, backend=backend, offset=5)
                for t, w in zip(ts, want):
                    assert torch.equal(_bits(t), _bits(w)), f"{backend.path} {seeds} {coeffs} {dt} {decay}"


@pytest.mark.parametrize("backend", CPU_PATH_PARAMS)
def test_paths_special_values(backend):
    """Zero coefficients (signed zeros), NaN, infinities and float16/bfloat16 overflow in the data:
    every path rounds and propagates exactly as the numpy reference (which rounds like c10)."""
    select(backend)
    vals = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, -65504.0,
                         3.0e38, 1e-40, -1e-45] * 40)
    for K, coeffs in ((1, [0.0]), (1, [-0.0]), (2, [0.0, -0.0]), (5, [1e30, 0.0, -1e30, 1e-30, 0.0])):
        seeds = [2**64 - 1 - k for k in range(K)]
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for decay in (1.0, 0.5):
                ts = [vals.to(dt)]
                want = _expected(ts, seeds, coeffs, decay, 0)
                zo_kernels.apply_seeds_(ts, seeds, coeffs, decay=decay, backend=backend)
                got, w = _bits(ts[0]), _bits(want[0])
                if dt != torch.float32:  # NaN payloads: c10 and numpy->torch agree on one pattern
                    nan = torch.isnan(ts[0]) & torch.isnan(want[0])
                    got, w = got[~nan], w[~nan]
                assert torch.equal(got, w), f"{backend.path} K={K} {dt} decay={decay}"


# ------------------------------------------------------------------------------------------------
# path selection
# ------------------------------------------------------------------------------------------------
_ISA_SCRIPT = r"""
import hashlib, warnings
import torch, zo_kernels
from zo_kernels import _backends
g = torch.Generator().manual_seed(5)
ts = [torch.randn(n, generator=g).to(dt) for n, dt in
      [(4097, torch.float32), (300000, torch.float32), (1000, torch.bfloat16), (777, torch.float16)]]
for K in (1, 2, 7, 16, 64, 70):
    seeds = [int(s) for s in torch.randint(0, 2**62, (K,), generator=g)]
    seeds[0] = 2**64 - 1
    zo_kernels.apply_seeds_(ts, seeds, (torch.randn(K, generator=g) * 1e-2).tolist(), 0.999,
                            backend="cpu")
h = hashlib.sha256()
for t in ts:
    h.update(t.view(torch.int32 if t.dtype == torch.float32 else torch.int16).numpy().tobytes())
print(_backends.cpu_path(), h.hexdigest())
print(_backends.cpu_extension().cpu_isa())
"""


def _run(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ZO_KERNELS_ISA", "ZO_KERNELS_NO_AVX512")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", _ISA_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def default_run():
    if _backends.cpu_extension() is None:
        pytest.skip("the C++ CPU backend is not built")
    out = _run({})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("\n")[0].split()


@pytest.mark.parametrize("path", PATHS)
def test_zo_kernels_isa_env_forces_the_path(path, default_run):
    """ZO_KERNELS_ISA=path runs that path (cpu_isa() names it first) and gives the default path's
    bytes; the default is the highest path the CPU runs."""
    paths = _backends.cpu_paths()
    assert default_run[0] == paths[0]
    if path not in paths:
        pytest.skip(f"this CPU does not run the {path} path (it runs {', '.join(paths)})")
    out = _run({"ZO_KERNELS_ISA": path})
    assert out.returncode == 0, out.stderr[-2000:]
    line0, line1 = out.stdout.split("\n")[:2]
    assert line0.split()[0] == path and line1.split()[0] == path
    assert line0.split()[1] == default_run[1], f"{path} and {default_run[0]} paths disagree"


def test_legacy_no_avx512_caps_at_avx2(default_run):
    if "avx2" not in _backends.cpu_paths():
        pytest.skip("this CPU does not run the avx2 path")
    out = _run({"ZO_KERNELS_NO_AVX512": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["avx2", default_run[1]]


def test_unknown_isa_env_value_raises_on_use():
    """A bad ZO_KERNELS_ISA does not break the import; every CPU-backend call raises ValueError
    naming the variable and the allowed values, and changes nothing."""
    if _backends.cpu_extension() is None:
        pytest.skip("the C++ CPU backend is not built")
    code = ("import torch, zo_kernels\n"
            "x = torch.ones(300); y = x.clone()\n"
            "try:\n"
            "    zo_kernels.apply_seeds_([x], [1], [0.5])\n"
            "except ValueError as e:\n"
            "    print('ERR', e, torch.equal(x, y))\n")
    env = {k: v for k, v in os.environ.items() if k != "ZO_KERNELS_NO_AVX512"}
    env["ZO_KERNELS_ISA"] = "avx3"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ERR") and out.stdout.strip().endswith("True"), out.stdout
    assert "ZO_KERNELS_ISA='avx3'" in out.stdout and "avx512, avx2, portable" in out.stdout


def test_set_cpu_path_checks_the_name():
    if _backends.cpu_extension() is None:
        pytest.skip("the C++ CPU backend is not built")
    with pytest.raises(ValueError, match="unknown CPU path 'sse9'; allowed: avx512, avx2, portable"):
        _backends.set_cpu_path("sse9")
    paths = _backends.cpu_paths()
    assert paths[-1] == "portable" and paths == [p for p in PATHS if p in paths]
    missing = [p for p in PATHS if p not in paths]
    if missing:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            _backends.set_cpu_path(missing[0])
    prev = _backends.set_cpu_path("portable")
    assert _backends.cpu_path() == "portable" and prev in paths
    assert _backends.cpu_extension().cpu_isa().split()[0] == "portable"


# ------------------------------------------------------------------------------------------------
# the fast entry
# ------------------------------------------------------------------------------------------------
def _fast():
    ext = _backends.cpu_extension()
    if ext is None:
        pytest.skip("the C++ CPU backend is not built")
    return ext.apply_seeds_fast


def test_fast_entry_takes_the_plain_call_and_matches_general_path():
    fast = _fast()
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(n, generator=g) for n in (300, 1, 129)] + [torch.randn(77).half()]
    seeds, coeffs = [3, 2**64 - 1, 2**63], [0.5, -0.25, 1e-3]
    a = [t.clone() for t in base]
    b = [t.clone() for t in base]
    assert fast(a, seeds, coeffs, 0.999, "rademacher", 2**32 + 5) is True
    # the general path: seeds and coeffs as tensors are not the fast entry's kind of input
    zo_kernels.apply_seeds_(b, torch.tensor([3, -1, -2**63]), torch.tensor(coeffs), 0.999,
                            offset=2**32 + 5)
    for x, y in zip(a, b):
        assert torch.equal(_bits(x), _bits(y))
    assert fast((a[0],), (7,), (1,), 1, "gaussian", 0) is True  # tuples, ints as coefficients


@pytest.mark.parametrize("case", [
    "int32 tensor", "non-contiguous", "overlap", "same tensor twice", "seed negative",
    "seed 2**64", "seed bool", "seed float", "coeff nan", "coeff inf", "coeff overflows float32",
    "coeff str", "length mismatch", "decay nan", "decay overflows float32", "decay bool",
    "dist unknown", "offset negative", "offset float", "offset + size past 2**63",
    "seeds tensor", "not a list", "requires grad in grad mode", "meta tensor", "inference tensor"])
def test_fast_entry_refuses_and_touches_nothing(case):
    """Each input the general path must reject or handle: the fast entry returns False and every
    tensor keeps its bits (so the general path raises with its message, before any change)."""
    fast = _fast()
    x = torch.randn(300)
    y = torch.randn(200)
    args = dict(tensors=[x, y], seeds=[1, 2], coeffs=[0.5, -0.5], decay=1.0, dist="rademacher",
                offset=0)
    if case == "int32 tensor":
        args["tensors"] = [x, torch.zeros(10, dtype=torch.int32)]
    elif case == "non-contiguous":
        args["tensors"] = [x, torch.randn(20, 30).t()]
    elif case == "overlap":
        buf = torch.randn(500)
        args["tensors"] = [buf[:300], buf[200:]]
    elif case == "same tensor twice":
        args["tensors"] = [x, x]
    elif case == "seed negative":
        args["seeds"] = [1, -1]
    elif case == "seed 2**64":
        args["seeds"] = [1, 2**64]
    elif case == "seed bool":
        args["seeds"] = [1, True]
    elif case == "seed float":
        args["seeds"] = [1, 2.0]
    elif case == "coeff nan":
        args["coeffs"] = [0.5, float("nan")]
    elif case == "coeff inf":
        args["coeffs"] = [0.5, float("inf")]
    elif case == "coeff overflows float32":
        args["coeffs"] = [0.5, 1e39]
    elif case == "coeff str":
        args["coeffs"] = [0.5, "0.5"]
    elif case == "length mismatch":
        args["coeffs"] = [0.5]
    elif case == "decay nan":
        args["decay"] = float("nan")
    elif case == "decay overflows float32":
        args["decay"] = 1e39
    elif case == "decay bool":
        args["decay"] = True
    elif case == "dist unknown":
        args["dist"] = "uniform"
    elif case == "offset negative":
        args["offset"] = -1
    elif case == "offset float":
        args["offset"] = 0.0
    elif case == "offset + size past 2**63":
        args["offset"] = 2**63 - 200
    elif case == "seeds tensor":
        args["seeds"] = torch.tensor([1, 2])
    elif case == "not a list":
        args["tensors"] = {x, y}
    elif case == "requires grad in grad mode":
        args["tensors"] = [x, y.requires_grad_()]
    elif case == "meta tensor":
        args["tensors"] = [x, torch.empty(10, device="meta")]
    elif case == "inference tensor":
        with torch.inference_mode():
            z = torch.randn(10)
        args["tensors"] = [x, z]
    ts = [t for t in (args["tensors"] if isinstance(args["tensors"], (list, tuple)) else [])
          if t.device.type == "cpu"]
    before = [t.detach().clone() for t in ts]
    with torch.enable_grad():
        assert fast(**args) is False
    for t, b in zip(ts, before):
        t = t.detach().contiguous()
        assert torch.equal(t.view(torch.uint8), b.contiguous().view(torch.uint8)), case


# ------------------------------------------------------------------------------------------------
# autograd: version counters and leaves
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params(["reference", "cpu", "triton", "cuda"]))
def test_backward_through_updated_weights_raises(backend):
    """The issue's repro: a graph saved ``w`` before an update under no_grad; backward must raise
    as torch's in-place ops make it raise, on every backend."""
    select(backend)
    info = zo_kernels.backends()[backend]
    if not info["usable"]:
        pytest.skip(f"backend {backend!r} not usable here: {info['why']}")
    dev = "cuda" if backend in ("triton", "cuda") and "cuda" in info["devices"] else "cpu"
    if dev not in info["devices"]:
        pytest.skip(f"backend {backend!r} does not take {dev} tensors here")
    w = torch.randn(256, device=dev, requires_grad=True)
    loss = (w * w).sum()
    v0 = w._version
    with torch.no_grad():
        zo_kernels.apply_seeds_([w], [1], [0.5], backend=backend)
    assert w._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_leaf_requiring_grad_refused_in_grad_mode(backend):
    """Outside no_grad, a leaf that requires grad is refused with torch's words, unchanged; a
    detached view of it is fine and bumps the leaf's version (they share the counter)."""
    select(backend)
    w = torch.nn.Parameter(torch.randn(300))
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an "
                                           "in-place operation"):
        zo_kernels.apply_seeds_([w], [1], [0.5], backend=backend)
    assert torch.equal(w.detach(), before) and w._version == 0
    zo_kernels.apply_seeds_([w.detach()], [1], [0.5], backend=backend)
    assert w._version >= 1 and not torch.equal(w.detach(), before)
    h = (w * 2)  # a non-leaf that requires grad: no derivative to record, refused
    with pytest.raises(RuntimeError, match="has no derivative"):
        zo_kernels.apply_seeds_([h], [1], [0.5], backend=backend)


def test_registered_op_bumps_versions():
    w = torch.randn(256, requires_grad=True)
    loss = (w * w).sum()
    with torch.no_grad():
        torch.ops.zo_kernels.apply_seeds_([w], torch.tensor([1]), torch.tensor([0.5]), [0], 1.0,
                                          "rademacher")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_noop_calls_keep_versions():
    """A call that changes nothing (K = 0 with decay 1) leaves the counters alone."""
    x = torch.randn(300)
    zo_kernels.apply_seeds_([x], [], [])
    zo_kernels.apply_seeds_([x], [], [], backend="reference")
    assert x._version == 0
