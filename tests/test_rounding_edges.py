"""bfloat16 / float16 rounding edges of ``apply_seeds_``, built on purpose, on every backend and CPU
path usable here, against ``torch.from_numpy(fp32_result).to(dtype)`` where ``fp32_result`` comes
from the independent numpy implementation of the grouped order (``tests/_philox_np.py``).

The contract (``apply_seeds_`` docstring): all arithmetic in fp32, round to nearest even, then one
rounding to the tensor's dtype. The cases here put the fp32 result where a different rounding shows:

- exact halfway points between two neighbouring bf16/fp16 values (``c`` = half an ulp of ``p``), in
  several binades, with K = 1 and K = 8 (two groups, zero coefficients), with decay 0.5, and in the
  subnormal range of each dtype (a guard counts them: at least 200 per dtype, rounded both ways);
- fp16 overflow to +-inf (65504 + 16 is a tie that rounds to inf; 65504 + 1e5), bf16 overflow (the
  largest bf16 plus half an ulp), fp32 overflow of ``acc`` itself (3e38 + 3e38);
- subnormals of the dtype, and fp32 subnormals in the arithmetic (bf16 subnormals are fp32
  subnormals: flush-to-zero or denormals-are-zero would show);
- -0.0 in the weights, and results that round to -0.0 (tiny negative fp32 values);
- NaN, +inf and -inf already in the weights (and inf - inf from an overflowing ``acc``);
- every one of the 65,536 bit patterns of each half type as a weight, with K = 1, 2, 3 and a decay.

Bits are compared as raw integers (``torch.equal`` treats -0.0 == 0.0 and NaN != NaN). NaN
payloads: float32 results are compared bit for bit, NaN included; bf16/fp16 results only need a NaN
where the reference has one (the contract does not fix the payload of a NaN converted to a half
type). CUDA runs only where a GPU is present; Triton runs in its CPU interpreter otherwise.

Found by this file: the Triton kernel before the GPU-path merge read bfloat16 with
``.to(tl.float32)``, which the Triton interpreter converts wrongly for subnormals (86 * 2**-133 read
as 44 * 2**-133, -2**-133 as -0.0); the GPU-path kernel reads raw bits and passes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import _philox_np as ref
import zo_kernels
from zo_kernels import _backends

HALF_DTYPES = (torch.bfloat16, torch.float16)
#: mantissa bits, smallest normal exponent
_FMT = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}
SEEDS8 = [2**64 - 1, 0, 2**63 + 11, 12345, 2**40 + 7, 99, 2**62, 7]


@dataclass
class Case:
    name: str
    dtype: torch.dtype
    values: np.ndarray        # float32, each exactly representable in ``dtype``
    seeds: list
    coeffs: list
    decay: float = 1.0
    offset: int = 0
    #: the tensor's raw 16-bit patterns (half dtypes), when they must reach the kernel as they are
    #: (a float32 -> half conversion would canonicalize NaNs); ``values`` holds them as float32
    raw_bits: np.ndarray | None = None


def _pow2(e: int) -> float:
    return float(np.ldexp(1.0, e))


def _binade(dtype, e: int, n: int, seed: int) -> np.ndarray:
    """n values of random sign in [2**e, 2**(e+1)) on the dtype's grid, off the binade's edges."""
    m, _ = _FMT[dtype]
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 2**m - 1, n)
    sign = rng.choice([-1.0, 1.0], n)
    return (sign * (1.0 + k / 2**m) * _pow2(e)).astype(np.float32)


def _subnormals(dtype, n: int, seed: int) -> np.ndarray:
    """n subnormal values of the dtype (random sign), k * 2**(emin - m) for k in 1 .. 2**m - 1."""
    m, emin = _FMT[dtype]
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 2**m, n)
    sign = rng.choice([-1.0, 1.0], n)
    return (sign * k * _pow2(emin - m)).astype(np.float32)


EVERY_VALUE = "every value"


def build_cases() -> list[Case]:
    cases = []
    for dt in HALF_DTYPES:
        m, emin = _FMT[dt]
        tag = str(dt).split(".")[1]
        for e in (-5, 0, 7):  # ties: p + c with c = half an ulp of p (ulp = 2**(e - m))
            cases.append(Case(f"{tag} ties 2^{e} K=1", dt, _binade(dt, e, 256, 10 + e),
                              [SEEDS8[0]], [_pow2(e - m - 1)], offset=2**32 - 77))
        cases.append(Case(f"{tag} ties K=8 two groups", dt, _binade(dt, 0, 256, 3), SEEDS8,
                          [_pow2(-m - 1)] + [0.0] * 7, offset=129))
        # decay 0.5: p * 0.5 is exact and lies in [0.5, 1): half its ulp is 2**(-m - 2)
        cases.append(Case(f"{tag} ties decay 0.5", dt, _binade(dt, 0, 256, 4), SEEDS8[:3],
                          [_pow2(-m - 2), 0.0, -0.0], decay=0.5))
        # subnormal ties: half the subnormal spacing (an fp32 subnormal for bfloat16)
        cases.append(Case(f"{tag} subnormal ties", dt, _subnormals(dt, 256, 5), [SEEDS8[2]],
                          [_pow2(emin - m - 1)]))
        # results that underflow to -0.0 (and to the smallest subnormal), from -smallest subnormal
        tiny = _pow2(emin - m)
        cases.append(Case(f"{tag} round to -0.0", dt, np.full(130, -tiny, np.float32),
                          [SEEDS8[3]], [3 * tiny / 4]))
    # float16 overflow: 65504 + 16 is the tie between 65504 and 65536 (=inf): rounds to inf
    v = np.array([65504.0, -65504.0, 65472.0, -65472.0, 60000.0, 1.0] * 40, np.float32)
    cases.append(Case("float16 overflow tie", torch.float16, v, [SEEDS8[4]], [16.0]))
    cases.append(Case("float16 overflow", torch.float16, v, [SEEDS8[5], SEEDS8[6]], [1e5, 3.0]))
    # bfloat16 overflow: the largest bf16 (0x7F7F) plus half its ulp (2**119) rounds to inf
    bmax = float(torch.finfo(torch.bfloat16).max)
    v = np.array([bmax, -bmax, bmax / 2, 1.0] * 40, np.float32)
    cases.append(Case("bfloat16 overflow tie", torch.bfloat16, v, [SEEDS8[0]], [_pow2(119)]))
    # specials in the weights: -0.0, NaN, +-inf, subnormals, max values; acc overflowing fp32
    # (3e38 + 3e38 = inf, so -inf + inf = NaN), cancelling coefficients, zero coefficients
    for dt in (torch.float32,) + HALF_DTYPES:
        fmax = float(torch.finfo(dt).max)
        sub = float(torch.finfo(dt).smallest_normal) / 4
        raw = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, fmax, -fmax, sub, -sub, 1.5, -2.5],
                       np.float32)
        v = np.tile(raw, 24)
        tag = str(dt).split(".")[1]
        for K, cs, decay in ((0, [], 0.5), (1, [0.0], 1.0), (1, [-0.0], 0.5), (2, [3e38, 3e38], 1.0),
                             (2, [0.25, -0.25], 1.0), (6, [1e30, 0.0, -1e30, 1e-30, 0.0, 2.0], 0.5)):
            cases.append(Case(f"{tag} specials K={K} {cs} decay {decay}", dt, v, SEEDS8[:K], cs,
                              decay, offset=2**39 + 5))
    # every value of each half type (65,536 bit patterns: subnormals, +-inf, NaNs included) through
    # the kernel's load and store: a round trip (c = 0), sums that round across the whole range and
    # overflow, and the decay multiply
    for dt, np_view in ((torch.float16, np.float16), (torch.bfloat16, None)):
        bits = np.arange(65536, dtype=np.uint32)
        if np_view is not None:
            with np.errstate(invalid="ignore"):
                v = bits.astype(np.uint16).view(np_view).astype(np.float32)
        else:
            v = (bits << 16).view(np.float32)
        tag = str(dt).split(".")[1]
        for K, cs, decay in ((1, [0.0], 1.0), (2, [_pow2(-12), 3.0], 1.0),
                             (3, [1e-4, -_pow2(-20), 0.5], 0.75)):
            cases.append(Case(f"{tag} {EVERY_VALUE} K={K} {cs} decay {decay}", dt, v.copy(),
                              SEEDS8[3:3 + K], cs, decay, offset=17,
                              raw_bits=bits.astype(np.uint16)))
    # float32 subnormal arithmetic (the bf16 subnormal cases above rely on it too)
    cases.append(Case("float32 subnormals", torch.float32,
                      _subnormals(torch.float32, 256, 6), SEEDS8[:5],
                      [3 * _pow2(-149), _pow2(-140), -_pow2(-147), 0.0, _pow2(-149)], decay=0.5))
    return cases


CASES = build_cases()


def expected(case: Case) -> torch.Tensor:
    """``torch.from_numpy(fp32_result).to(dtype)``, fp32_result from the numpy grouped order."""
    return torch.from_numpy(_fp32(case)).to(case.dtype)


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def compare(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    gn, wn = torch.isnan(got), torch.isnan(want)
    assert torch.equal(gn, wn), f"{what}: NaN at {torch.nonzero(gn != wn).flatten()[:8].tolist()}"
    gi, wi = _int_view(got), _int_view(want)
    if got.dtype != torch.float32:  # half types: NaN payload not part of the contract
        gi, wi = gi[~gn], wi[~wn]
        g_vals, w_vals = got[~gn], want[~wn]
    else:
        g_vals, w_vals = got, want
    if not torch.equal(gi, wi):
        bad = torch.nonzero(gi != wi).flatten()
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} of {gi.numel()} elements differ; first: got "
                             f"{g_vals[i].item()!r} (bits {int(gi[i]) & 0xFFFFFFFF:#x}), want "
                             f"{w_vals[i].item()!r} (bits {int(wi[i]) & 0xFFFFFFFF:#x})")


# ------------------------------------------------------------------------------------------------
# the guard: the data contains what the docstring promises
# ------------------------------------------------------------------------------------------------
def _ties(fp32: np.ndarray, dtype) -> np.ndarray:
    """Mask of finite fp32 values exactly halfway between two neighbouring ``dtype`` values (the
    tie between the largest finite value and 2**(emax+1) counts: it rounds to inf). Computed on
    the dtype's grid in float64 (exact for fp32 inputs), without torch's conversion."""
    m, emin = _FMT[dtype]
    x = np.abs(np.asarray(fp32, np.float64))
    ok = np.isfinite(x) & (x > 0)
    _, ex = np.frexp(np.where(ok, x, 1.0))            # x = f * 2**ex, f in [0.5, 1)
    e = np.maximum(ex - 1, emin)                        # binade exponent (subnormals: emin)
    q = x / np.exp2(e - m)                              # x in units of the dtype's ulp there
    limit = np.exp2(np.frexp(float(torch.finfo(dtype).max))[1])   # 2**(emax+1)
    with np.errstate(invalid="ignore"):
        return ok & (q - np.floor(q) == 0.5) & (x < limit)


def _fp32_results(dtype):
    # the built edge cases only: the exhaustive ones would swamp the guard's counts
    return [(c, _fp32(c)) for c in CASES if c.dtype == dtype and EVERY_VALUE not in c.name]


def _fp32(case: Case) -> np.ndarray:
    """The numpy fp32 result (inf and NaN are intended in some cases: no warnings)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return ref.apply_seeds_fp32([case.values], case.seeds, case.coeffs, case.decay,
                                    start=case.offset)[0]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_guard_the_cases_contain_the_edges(dtype):
    """At least 200 exact halfway points per dtype (counted from the numpy fp32 results), rounded
    both ways (so round-half-up, round-half-away or truncation all disagree somewhere), overflow to
    inf, subnormal results, -0.0 results, NaN and inf in the weights; every input value exactly
    representable in the dtype (so the test tensors hold the intended values)."""
    res = _fp32_results(dtype)
    ties = up = down = 0
    subnormal = negzero = overflow = 0
    specials_in = set()
    for case, fp32 in res:
        back = torch.from_numpy(case.values).to(dtype).float().numpy()
        same = (back.view(np.uint32) == case.values.view(np.uint32)) | np.isnan(case.values)
        assert same.all(), f"{case.name}: inputs not representable in {dtype}"
        t = _ties(fp32, dtype)
        ties += int(t.sum())
        r = torch.from_numpy(fp32).to(dtype).float().numpy()
        up += int((t & (np.abs(r) > np.abs(fp32))).sum())
        down += int((t & (np.abs(r) < np.abs(fp32))).sum())
        tiny = float(torch.finfo(dtype).smallest_normal)
        subnormal += int(((r != 0) & (np.abs(r) < tiny)).sum())
        negzero += int(((r == 0) & np.signbit(r)).sum())
        overflow += int((np.isinf(r) & np.isfinite(fp32)).sum())
        for name, f in (("nan", np.isnan), ("inf", np.isinf)):
            if f(case.values).any():
                specials_in.add(name)
        if ((case.values == 0) & np.signbit(case.values)).any():
            specials_in.add("-0.0")
    assert ties >= 200, f"{dtype}: only {ties} exact halfway points"
    assert up >= 50 and down >= 50, (up, down)
    assert subnormal >= 50 and negzero >= 20 and overflow >= 20, (subnormal, negzero, overflow)
    assert specials_in == {"nan", "inf", "-0.0"}, specials_in


def test_guard_tie_counter_counts():
    """The tie counter itself: known ties and non-ties in bfloat16 and float16."""
    b = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, 1.0, 65520.0, -(1 + 2**-8)], np.float32)
    assert _ties(b, torch.bfloat16).tolist() == [True, True, False, False, False, True]
    h = np.array([1 + 2**-11, 65520.0, 65519.0, 2**-25, 3 * 2**-25, 2**-26], np.float32)
    assert _ties(h, torch.float16).tolist() == [True, True, False, True, True, False]


# ------------------------------------------------------------------------------------------------
# backends and CPU paths
# ------------------------------------------------------------------------------------------------
_HAS_PATH_API = hasattr(_backends, "set_cpu_path") and hasattr(_backends, "cpu_paths")
CPU_PATHS = ("avx512", "avx2", "portable")


def _backend_params():
    out = [pytest.param(("reference", None), id="reference")]
    if _HAS_PATH_API:
        out += [pytest.param(("cpu", p), id=f"cpu-{p}") for p in CPU_PATHS]
    else:  # older build: the default path in process, the portable one in a fresh process
        out += [pytest.param(("cpu", None), id="cpu-default"),
                pytest.param(("cpu", "portable-subprocess"), id="cpu-portable")]
    out += [pytest.param(("triton", None), id="triton"), pytest.param(("cuda", None), id="cuda")]
    return out


def _device_for(backend: str) -> str:
    info = zo_kernels.backends()[backend]
    devices = info["devices"] if info["usable"] else []
    for dev in (("cuda", "cpu") if backend in ("triton", "cuda") else ("cpu",)):
        if dev in devices:
            return dev
    pytest.skip(f"backend {backend!r} not usable here: {info['why'] or info['devices']}")


@pytest.fixture
def restore_cpu_path():
    prev = _backends.cpu_path() if _HAS_PATH_API and _backends.cpu_extension() is not None else None
    yield
    if prev is not None:
        _backends.set_cpu_path(prev)


def _input(case: Case, dev: str = "cpu") -> torch.Tensor:
    if case.raw_bits is not None:
        return torch.from_numpy(case.raw_bits.view(np.int16).copy()).view(case.dtype).to(dev)
    return torch.from_numpy(case.values.copy()).to(case.dtype).to(dev)


def test_guard_every_value_cases_hold_every_bit_pattern():
    """The exhaustive cases give the kernel all 65,536 bit patterns of their dtype, NaNs with their
    own sign and payload included (a float32 -> half conversion would have canonicalized them)."""
    seen = set()
    for case in CASES:
        if EVERY_VALUE in case.name:
            bits = _input(case).view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(np.sort(bits), np.arange(65536, dtype=np.uint16)), case.name
            seen.add(case.dtype)
    assert seen == set(HALF_DTYPES)


def _run_case(case: Case, backend: str, dev: str) -> torch.Tensor:
    t = _input(case, dev)
    zo_kernels.apply_seeds_([t], case.seeds, case.coeffs, decay=case.decay, backend=backend,
                            offset=case.offset)
    return t.cpu()


_SUBPROCESS = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
import torch, zo_kernels
import test_rounding_edges as T
out = {"isa": zo_kernels._backends.cpu_extension().cpu_isa(), "results": []}
for case in T.CASES:
    got = T._run_case(case, "cpu", "cpu")
    out["results"].append(T._int_view(got).tolist())
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", _backend_params())
def test_edges_bit_exact_on_every_backend(backend, restore_cpu_path):
    name, path = backend
    dev = _device_for(name)
    if path == "portable-subprocess":
        env = dict(os.environ, ZO_KERNELS_NO_AVX512="1", ZO_KERNELS_ISA="portable")
        res = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(Path(__file__).parent)],
                             capture_output=True, text=True, env=env, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        data = json.loads(res.stdout.strip().splitlines()[-1])
        assert "avx512" not in data["isa"], data["isa"]
        width = {torch.float32: torch.int32}
        for case, bits in zip(CASES, data["results"]):
            got = torch.tensor(bits, dtype=width.get(case.dtype, torch.int16)).view(case.dtype)
            compare(got, expected(case), f"cpu[portable] {case.name}")
        return
    if path is not None:
        if _backends.cpu_extension() is None:
            pytest.skip("the C++ CPU backend is not built")
        if path not in _backends.cpu_paths():
            pytest.skip(f"this CPU does not run the {path} path (it runs "
                        f"{', '.join(_backends.cpu_paths())})")
        _backends.set_cpu_path(path)
    for case in CASES:
        compare(_run_case(case, name, dev), expected(case), f"{name}[{path}] {case.name}")
