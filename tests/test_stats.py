"""Statistical checks of noise stream v1 on its own (Triton's test_random.py does the same).

Every bound comes from n: for n independent +-1 values the mean has standard deviation 1/sqrt(n),
the share of +1 has 0.5/sqrt(n), and the sample correlation of two independent streams has about
1/sqrt(n). Tests allow Z = 6 standard deviations (a false alarm about once in 5e8 per check), and a
self-test shows each check does reject a slightly defective stream at these sizes. Seeds are fixed,
so the tests are deterministic.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import zo_kernels

Z = 6.0


def _n() -> int:
    """Elements per stream: 2**20 with the compiled CPU backend, fewer on the slow reference."""
    return 1 << 20 if zo_kernels.backends()["cpu"]["usable"] else 1 << 17


def _z(seed: int, n: int, offset: int = 0, dist: str = "rademacher") -> np.ndarray:
    return zo_kernels.noise(seed, n, offset=offset, dist=dist).numpy().astype(np.float64)


def check_balanced(z: np.ndarray, what: str) -> None:
    """+-1 stream: mean within Z/sqrt(n) of 0, share of +1 within Z*0.5/sqrt(n) of 1/2."""
    n = z.size
    assert set(np.unique(z)) <= {-1.0, 1.0}, f"{what}: values other than +-1"
    mean, share = z.mean(), (z > 0).mean()
    assert abs(mean) < Z / math.sqrt(n), f"{what}: mean {mean:.5f} over n={n}"
    assert abs(share - 0.5) < Z * 0.5 / math.sqrt(n), f"{what}: share of +1 {share:.5f} over n={n}"


def check_uncorrelated(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Pearson correlation of two equally long streams within Z/sqrt(n) of 0."""
    n = a.size
    r = np.corrcoef(a, b)[0, 1]
    bound = Z / math.sqrt(n)
    assert abs(r) < bound, f"{what}: correlation {r:.5f} over n={n}, bound {bound:.5f}"


def test_checks_reject_defective_streams():
    """The bounds are tight enough to fail: P(+1) = 0.52, or 5% of values shared, is caught."""
    n = _n()
    rng = np.random.default_rng(0)
    fair = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    check_balanced(fair, "numpy fair coin")
    biased = np.where(rng.random(n) < 0.52, 1.0, -1.0)
    with pytest.raises(AssertionError, match="mean"):
        check_balanced(biased, "biased")
    other = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    check_uncorrelated(fair, other, "independent")
    copy_some = np.where(rng.random(n) < 0.05, fair, other)  # correlation ~ 0.05
    with pytest.raises(AssertionError, match="correlation"):
        check_uncorrelated(fair, copy_some, "partly copied")


@pytest.mark.parametrize("seed", [0, 1, 2**32, 2**63, 2**64 - 1, 0x243F6A8885A308D3])
@pytest.mark.parametrize("offset", [0, 2**39 - 2**19])  # second one crosses block index 2**32
def test_rademacher_mean_and_share(seed, offset):
    check_balanced(_z(seed, _n(), offset), f"seed={seed} offset={offset}")


def test_rademacher_every_bit_position_balanced():
    """Each of the 128 positions in a block (bit j % 32 of word j // 32) is +1 half the time."""
    n = _n()
    blocks = _z(2**63 + 77, n).reshape(-1, 128)
    nb = blocks.shape[0]
    share = (blocks > 0).mean(axis=0)
    worst = int(np.argmax(np.abs(share - 0.5)))
    assert abs(share[worst] - 0.5) < Z * 0.5 / math.sqrt(nb), \
        f"bit position {worst}: share of +1 {share[worst]:.4f} over {nb} blocks"


@pytest.mark.parametrize("s0,s1", [
    (0, 1), (41, 42), (2**32 - 1, 2**32), (2**63 - 1, 2**63), (2**64 - 2, 2**64 - 1),
    (12345, 12345 + 2**32),  # differ only in the key's high word
])
def test_no_correlation_between_adjacent_seeds(s0, s1):
    n = _n()
    check_uncorrelated(_z(s0, n), _z(s1, n), f"seeds {s0}, {s1}")


@pytest.mark.parametrize("offset", [0, 2**39 - 2**19])
def test_no_correlation_between_adjacent_blocks_or_bits(offset):
    """Block b against b+1 (same position), and neighbours within a block: j vs j+1 (same word),
    j vs j+32 (same bit of the next word)."""
    n = _n()
    blocks = _z(2**64 - 12345, n, offset).reshape(-1, 128)
    check_uncorrelated(blocks[:-1].ravel(), blocks[1:].ravel(), "block b vs b+1")
    check_uncorrelated(blocks[:, :-1].ravel(), blocks[:, 1:].ravel(), "element j vs j+1")
    check_uncorrelated(blocks[:, :96].ravel(), blocks[:, 32:].ravel(), "word w vs w+1")


def test_gaussian_moments_and_independence():
    """Mean 0 (sd 1/sqrt(n)), variance 1 (sd sqrt(2/n)), P(|z| < 1) = 0.6827 (binomial sd), no
    correlation with the adjacent seed or the adjacent index."""
    n = _n()
    z = _z(2**63 + 9, n, 2**32 - n // 2, "gaussian")
    assert abs(z.mean()) < Z / math.sqrt(n), f"mean {z.mean():.5f}"
    assert abs(z.var() - 1.0) < Z * math.sqrt(2.0 / n), f"variance {z.var():.5f}"
    p1 = math.erf(1 / math.sqrt(2))
    inside = (np.abs(z) < 1).mean()
    assert abs(inside - p1) < Z * math.sqrt(p1 * (1 - p1) / n), f"P(|z|<1) = {inside:.5f}"
    check_uncorrelated(z, _z(2**63 + 10, n, 2**32 - n // 2, "gaussian"), "adjacent seeds")
    check_uncorrelated(z[:-1], z[1:], "adjacent indices")
