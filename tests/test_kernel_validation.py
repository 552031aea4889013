"""Bad input raises a clear error naming the problem and changes nothing; no-op cases; opcheck.

Each bad call is made with a valid float32 tensor first in the list (and, where the bad part is not
a tensor, only valid tensors), and every tensor is compared bit for bit with a copy taken before
the call, so a backend that writes before it validates is caught.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import _philox_np as ref
import zo_kernels

GOOD_SEEDS = [1, 2**63 + 5]
GOOD_COEFFS = [0.5, -0.25]


def _valid(n=300):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, generator=g)


def _snapshot(ts):
    return [t.detach().clone() for t in ts
            if isinstance(t, torch.Tensor) and t.device.type != "meta"]


def _bytes(t):
    return t.contiguous().view(-1).view(torch.uint8)


def _assert_unchanged(ts, before):
    after = [t for t in ts if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    assert len(after) == len(before)
    for k, (a, b) in enumerate(zip(after, before)):
        if a.is_complex() or not a.is_floating_point():
            assert torch.equal(a, b), f"tensor {k} changed by a rejected call"
        else:  # compare bit patterns (NaN-safe)
            assert torch.equal(_bytes(a), _bytes(b)), \
                f"tensor {k} changed by a rejected call"


def _expect_error(exc, match, tensors, seeds=GOOD_SEEDS, coeffs=GOOD_COEFFS, **kw):
    before = _snapshot(tensors)
    with pytest.raises(exc, match=match):
        zo_kernels.apply_seeds_(tensors, seeds, coeffs, **kw)
    _assert_unchanged(tensors, before)


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    torch.arange(10, dtype=torch.int32),
    torch.arange(10, dtype=torch.int64),
    torch.zeros(10, dtype=torch.uint8),
    torch.zeros(10, dtype=torch.bool),
    torch.zeros(10, dtype=torch.complex64),
    torch.zeros(10, dtype=torch.float64),
], ids=lambda t: str(t.dtype))
def test_unsupported_dtype_rejected(bad):
    _expect_error(TypeError, r"tensors\[1\] has dtype .*supported dtypes", [_valid(), bad])


def test_different_devices_rejected():
    _expect_error(ValueError, r"one device.*meta", [_valid(), torch.empty(10, device="meta")])


@pytest.mark.parametrize("make", [
    lambda: torch.randn(20, 30).t(),
    lambda: torch.randn(200)[::2],
    lambda: torch.randn(2, 3, 4, 5).permute(0, 2, 1, 3),
    lambda: torch.randn(10, 12)[:, :7],
], ids=["transpose", "step", "permute4d", "column-slice"])
def test_non_contiguous_rejected(make):
    _expect_error(ValueError, r"tensors\[1\].*not contiguous", [_valid(), make()])


def test_overlapping_views_rejected():
    base = torch.randn(400)
    _expect_error(ValueError, r"share memory", [base[:300], base[200:]])
    _expect_error(ValueError, r"share memory", [base, base])
    _expect_error(ValueError, r"share memory", [base.view(20, 20), base[100:150]])


def test_disjoint_views_of_one_buffer_accepted():
    """Contiguous, non-overlapping views of one storage are fine and get their own offsets."""
    base = torch.randn(400)
    parts = [base[:150], base[150:]]
    want = ref.apply_seeds_fp32([p.numpy().copy() for p in parts], GOOD_SEEDS, GOOD_COEFFS)
    zo_kernels.apply_seeds_(parts, GOOD_SEEDS, GOOD_COEFFS)
    for p, w in zip(parts, want):
        np.testing.assert_array_equal(p.numpy(), w)


def test_not_a_list_of_tensors_rejected():
    _expect_error(TypeError, r"tensors\[1\] is a list", [_valid(), [1.0, 2.0]])
    with pytest.raises(TypeError, match="tensors must be a Tensor or a list"):
        zo_kernels.apply_seeds_("weights", GOOD_SEEDS, GOOD_COEFFS)


# ------------------------------------------------------------------------------------------------
# seeds and coefficients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seeds,coeffs", [([1, 2, 3], [0.5, 0.5]), ([1], [0.5, 0.5]), ([], [1.0])])
def test_length_mismatch_rejected(seeds, coeffs):
    _expect_error(ValueError, r"len\(seeds\).*len\(coeffs\)", [_valid(), _valid(129)], seeds,
                  coeffs)


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64, 2**70])
def test_seed_out_of_range_rejected(seed):
    _expect_error(ValueError, r"seeds\[1\].*out of range.*2\*\*64", [_valid()], [3, seed],
                  GOOD_COEFFS)
    t = [_valid()]
    before = _snapshot(t)
    with pytest.raises(ValueError, match="out of range"):
        zo_kernels.perturb_(t, seed, 0.5)
    _assert_unchanged(t, before)
    with pytest.raises(ValueError, match="out of range"):
        zo_kernels.noise(seed, 10)


@pytest.mark.parametrize("seed", [1.0, "7", None, True])
def test_seed_wrong_type_rejected(seed):
    _expect_error(TypeError, r"seeds\[0\] must be an int", [_valid()], [seed], [0.5])


def test_seeds_tensor_wrong_dtype_rejected():
    _expect_error(TypeError, r"seeds tensor must have dtype torch.int64", [_valid()],
                  torch.tensor([1, 2], dtype=torch.int32), GOOD_COEFFS)
    _expect_error(TypeError, r"seeds tensor must have dtype torch.int64", [_valid()],
                  torch.tensor([1.0, 2.0]), GOOD_COEFFS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e39])
def test_non_finite_coeff_rejected(bad):
    """NaN, +-inf, and values that overflow float32 (1e39) are rejected, by position."""
    _expect_error(ValueError, r"coeffs\[1\].*not finite", [_valid(), _valid(77)], [1, 2],
                  [0.5, bad])
    _expect_error(ValueError, r"coeffs\[1\].*not finite", [_valid()], [1, 2],
                  torch.tensor([0.5, bad], dtype=torch.float64))
    t = [_valid()]
    before = _snapshot(t)
    with pytest.raises(ValueError, match="not finite"):
        zo_kernels.perturb_(t, 3, bad)
    _assert_unchanged(t, before)


def test_coeff_wrong_type_rejected():
    _expect_error(TypeError, r"coeffs\[0\] must be a real number", [_valid()], [1], ["0.5"])
    _expect_error(TypeError, r"coeffs tensor must be floating point", [_valid()], [1],
                  torch.tensor([1], dtype=torch.int64))


@pytest.mark.parametrize("decay", [float("nan"), float("inf"), 1e39, "0.9"])
def test_bad_decay_rejected(decay):
    _expect_error(ValueError, r"decay", [_valid()], decay=decay)


def test_bad_offset_rejected():
    _expect_error(ValueError, r"offset must be an int >= 0", [_valid()], offset=-1)
    _expect_error(ValueError, r"offset must be an int >= 0", [_valid()], offset=1.5)
    _expect_error(ValueError, r"exceeds 2\*\*63", [_valid()], offset=2**63 - 10)


# ------------------------------------------------------------------------------------------------
# names: dist and backend
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["uniform", "Rademacher", "", "normal"])
def test_unknown_dist_rejected(dist):
    _expect_error(ValueError, r"unknown dist .*rademacher.*gaussian", [_valid()], dist=dist)
    with pytest.raises(ValueError, match="unknown dist"):
        zo_kernels.noise(1, 10, dist=dist)


@pytest.mark.parametrize("backend", ["gpu", "CPU", "torch", "Auto"])
def test_unknown_backend_rejected(backend):
    _expect_error(ValueError, r"unknown backend .*reference", [_valid()], backend=backend)


def test_cuda_backend_on_cpu_tensors_rejected():
    """Forcing the CUDA backend on CPU tensors fails with a reason and touches nothing."""
    err = ValueError if zo_kernels.backends()["cuda"]["built"] else (RuntimeError, ValueError)
    _expect_error(err, r"backend 'cuda'", [_valid()], backend="cuda")


_UNBUILT_SCRIPT = """
import sys, warnings
sys.modules["zo_kernels._C"] = None   # the C++ extension as if it had not been built
sys.modules["triton"] = None          # triton as if it were not installed
warnings.simplefilter("ignore")
import torch, zo_kernels
rep = zo_kernels.backends()
assert not rep["cpu"]["built"] and not rep["triton"]["built"], rep
t = torch.randn(300)
before = t.clone()
for b in ("cpu", "triton"):
    try:
        zo_kernels.apply_seeds_([t], [1, 2**63 + 5], [0.5, -0.25], backend=b)
    except (RuntimeError, ValueError) as e:
        print(b, "|", type(e).__name__, "|", e)
    else:
        print(b, "| no error")
assert torch.equal(t.view(torch.int32), before.view(torch.int32)), "a refused call wrote"
zo_kernels.apply_seeds_([t], [1], [0.5])  # the default falls back to the reference
print("default | ok")
"""


def test_unbuilt_backend_rejected_and_named():
    """Forcing a backend that is not built raises with its name and touches nothing, while the
    default falls back to the reference. Run in a fresh process where the C++ extension and triton
    cannot be imported (both are built here, so in this process nothing is unbuilt)."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", _UNBUILT_SCRIPT], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(ln.split(" | ", 1) for ln in res.stdout.strip().splitlines())
    assert lines["default"] == "ok"
    for b in ("cpu", "triton"):
        assert lines[b].startswith("RuntimeError | ") and f"backend '{b}'" in lines[b], lines[b]


# ------------------------------------------------------------------------------------------------
# no-ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, "reference"])
def test_empty_inputs_are_noops(backend):
    zo_kernels.apply_seeds_([], GOOD_SEEDS, GOOD_COEFFS, backend=backend)
    zo_kernels.apply_seeds_([], [], [], backend=backend)
    e = [torch.empty(0), torch.empty(0, 5, dtype=torch.bfloat16)]
    zo_kernels.apply_seeds_(e, GOOD_SEEDS, GOOD_COEFFS, decay=0.5, backend=backend)
    assert [t.shape for t in e] == [(0,), (0, 5)]
    t = [_valid(), _valid(129)]
    before = _snapshot(t)
    zo_kernels.apply_seeds_(t, [], [], backend=backend)  # K = 0, decay = 1
    _assert_unchanged(t, before)


def test_empty_tensor_in_list_takes_no_space():
    """An empty tensor between two others occupies no block: the next one starts where it would
    without it."""
    a, e, b = _valid(130), torch.empty(0), _valid(5)
    want = ref.apply_seeds_fp32([a.numpy().copy(), b.numpy().copy()], GOOD_SEEDS, GOOD_COEFFS)
    assert zo_kernels.offsets([a, e, b]) == [0, 256, 256]
    zo_kernels.apply_seeds_([a, e, b], GOOD_SEEDS, GOOD_COEFFS)
    np.testing.assert_array_equal(a.numpy(), want[0])
    np.testing.assert_array_equal(b.numpy(), want[1])


# ------------------------------------------------------------------------------------------------
# torch.library registration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opcheck(dist, dtype):
    ts = [torch.randn(3, 5).to(dtype), torch.randn(129).to(dtype), torch.randn(1).to(dtype)]
    seeds = torch.tensor([1, -5, 2**62], dtype=torch.int64)
    coeffs = torch.tensor([0.5, -0.25, 1e-3], dtype=torch.float32)
    bases = zo_kernels.offsets(ts, 2**32 + 7)
    torch.library.opcheck(torch.ops.zo_kernels.apply_seeds_.default,
                          (ts, seeds, coeffs, bases, 0.999, dist))


def test_op_mutates_in_place_like_public_api():
    """The registered op with explicit bases computes what ``apply_seeds_`` computes."""
    ts = [torch.randn(3, 5), torch.randn(129)]
    want = ref.apply_seeds_fp32([t.reshape(-1).numpy().copy() for t in ts], [7, 2**64 - 1],
                                [0.5, -0.125], 0.999, start=128)
    torch.ops.zo_kernels.apply_seeds_(ts, torch.tensor([7, -1]), torch.tensor([0.5, -0.125]),
                                      zo_kernels.offsets(ts, 128), 0.999, "rademacher")
    for t, w in zip(ts, want):
        np.testing.assert_array_equal(t.reshape(-1).numpy(), w)


@pytest.mark.parametrize("dist", ["uniform", "Rademacher", ""])
def test_registered_op_rejects_unknown_dist_listing_allowed(dist):
    ts = [_valid(), _valid(129)]
    before = _snapshot(ts)
    with pytest.raises(ValueError, match=r"unknown dist .*allowed: 'rademacher', 'gaussian'"):
        torch.ops.zo_kernels.apply_seeds_(ts, torch.tensor([1]), torch.tensor([0.5]),
                                          zo_kernels.offsets(ts), 1.0, dist)
    _assert_unchanged(ts, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_registered_op_rejects_non_finite_coeffs(bad):
    ts = [_valid(), _valid(129)]
    before = _snapshot(ts)
    with pytest.raises(ValueError, match=r"coeffs\[1\].*not finite"):
        torch.ops.zo_kernels.apply_seeds_(ts, torch.tensor([1, 2]), torch.tensor([0.5, bad]),
                                          zo_kernels.offsets(ts), 1.0, "rademacher")
    _assert_unchanged(ts, before)


def test_registered_op_rejects_the_same_tensor_twice_and_overlaps():
    x = _valid()
    before = _snapshot([x])
    for ts in ([x, x], [x[:200], x[100:]]):
        with pytest.raises(ValueError, match="share memory"):
            torch.ops.zo_kernels.apply_seeds_(ts, torch.tensor([1]), torch.tensor([0.5]),
                                              [0, 1024], 1.0, "rademacher")
    _assert_unchanged([x], before)


@pytest.mark.parametrize("what,args,match", [
    ("bases length", dict(bases=[0]), "1 bases for 2 tensors"),
    ("negative base", dict(bases=[0, -128]), r"bases\[1\] must be an int >= 0"),
    ("decay", dict(decay=float("nan")), "decay must be a finite"),
    ("seed/coeff lengths", dict(coeffs=torch.tensor([0.5, 0.5])), r"len\(seeds\) = 1"),
    ("seeds dtype", dict(seeds=torch.tensor([1], dtype=torch.int32)), "seeds must be a 1-D int64"),
    ("non-contiguous", dict(tensors=[torch.randn(20, 30).t(), torch.randn(5)]), "not contiguous"),
])
def test_registered_op_checks_its_arguments(what, args, match):
    call = dict(tensors=[_valid(), _valid(129)], seeds=torch.tensor([1]),
                coeffs=torch.tensor([0.5]), bases=[0, 384], decay=1.0, dist="rademacher")
    call.update(args)
    before = _snapshot(call["tensors"])
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.zo_kernels.apply_seeds_(call["tensors"], call["seeds"], call["coeffs"],
                                          call["bases"], call["decay"], call["dist"])
    _assert_unchanged(call["tensors"], before)
