"""Independent numpy implementation of noise stream v1 (docs/DESIGN.md, Noise stream) for the kernel
tests.

Written from the specification only; it deliberately does not import ``zo_kernels`` (neither its
reference nor anything else), so a mistake shared by the package and the tests cannot hide.

All unsigned 32-bit arithmetic is done in ``numpy.uint64``: a product of two values below 2**32 is
below 2**64, so ``(a * b) >> 32`` and ``(a * b) & 0xffffffff`` are exact.

Public helpers (all pure functions of their arguments):

- :func:`philox4x32_10` - the raw generator on arrays of counters.
- :func:`rademacher` - stream values ``z(seed)[offset : offset + n]`` as float32 +-1.
- :func:`gaussian` - Gaussian stream values as float32 (fp32 arithmetic mirrored step by step).
- :func:`flat_offsets` - 128-aligned starts of tensors in the flat vector.
- :func:`subset_sum_table` - one group's fp32 subset-sum table (numpy.float32 scalars).
- :func:`apply_seeds_fp32` - ``p * decay + sum_k c_k z_k`` with the exact fp32 operation order
  (Rademacher: the grouped order, groups of :data:`SUM_GROUP` seeds; other groupings on request, so
  tests can show that the data tells them apart).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

M32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
ROUND_A = np.uint64(0xD2511F53)  # multiplies counter word 0
ROUND_B = np.uint64(0xCD9E8D57)  # multiplies counter word 2
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUNDS = 10
BLOCK = 128
UNIFORM_SCALE = np.float32(4.6566127342e-10)
#: Seeds per subset-sum table in the contract's Rademacher accumulation order (docs/DESIGN.md,
#: Grouped summation order).
SUM_GROUP = 4
TWO_PI = np.float32(6.283185307179586)


def _u64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 with Triton's round structure.

    Args:
        c0..c3: counter words, array-likes of values in [0, 2**32) (broadcast together).
        k0, k1: key words, Python ints in [0, 2**32).

    Returns:
        Four ``uint64`` arrays holding the uint32 output words ``(x0, x1, x2, x3)``.
    """
    c0, c1, c2, c3 = (_u64(c) & M32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    for _ in range(ROUNDS):
        kk0, kk1 = np.uint64(k0), np.uint64(k1)
        prod_b = ROUND_B * c2  # < 2**64: exact in uint64
        prod_a = ROUND_A * c0
        n0 = (prod_b >> SHIFT32) ^ c1 ^ kk0
        n2 = (prod_a >> SHIFT32) ^ c3 ^ kk1
        n1 = prod_b & M32
        n3 = prod_a & M32
        c0, c1, c2, c3 = n0, n1, n2, n3
        k0 = (k0 + KEY_A) & 0xFFFFFFFF
        k1 = (k1 + KEY_B) & 0xFFFFFFFF
    return c0, c1, c2, c3


def key_of(seed: int) -> tuple[int, int]:
    """Philox key ``(seed & 0xffffffff, seed >> 32)`` for an unsigned 64-bit seed (Python int)."""
    if not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed {seed} is not an unsigned 64-bit integer")
    seed = int(seed)
    return seed & 0xFFFFFFFF, seed >> 32


def rademacher_bits(seed: int, n: int, offset: int = 0) -> np.ndarray:
    """uint8 array of length n: 1 where ``z(seed)[offset + e] = +1``, else 0.

    Block ``b = i // 128`` gives words ``philox(counter=(b lo, b hi, 0, 0), key(seed))``; element
    ``j = i % 128`` of the block takes bit ``j % 32`` of word ``j // 32``.
    """
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    first, last = offset // BLOCK, (offset + n - 1) // BLOCK
    blocks = np.arange(first, last + 1, dtype=np.uint64)  # Python ints up to 2**63 fit
    k0, k1 = key_of(seed)
    x = philox4x32_10(blocks & M32, blocks >> SHIFT32, 0, 0, k0, k1)
    words = np.stack(x, axis=1)  # (nblocks, 4)
    # bits[blk, w, t] = bit t of word w  ->  flat order j = 32 w + t
    bits = (words[:, :, None] >> np.arange(32, dtype=np.uint64)[None, None, :]) & np.uint64(1)
    bits = bits.reshape(-1).astype(np.uint8)
    start = offset - first * BLOCK
    return bits[start:start + n]


def rademacher(seed: int, n: int, offset: int = 0) -> np.ndarray:
    """float32 array ``z(seed)[offset : offset + n]`` with values +1.0 / -1.0."""
    return np.where(rademacher_bits(seed, n, offset) == 1, np.float32(1.0), np.float32(-1.0))


def _uniform(x: np.ndarray) -> np.ndarray:
    """Triton's uint_to_uniform_float for 32-bit words: bitcast to int32, fold negatives, scale.

    The int32 value is converted to float32 first and the product is rounded to float32, as the
    kernel computes ``x * scale`` with an int32 tensor and a float32 scalar.
    """
    s = x.astype(np.uint32).view(np.int32).astype(np.int64)
    s = np.where(s < 0, -s - 1, s)
    return (s.astype(np.float32) * UNIFORM_SCALE).astype(np.float32)


def gaussian(seed: int, n: int, offset: int = 0) -> np.ndarray:
    """float32 Gaussian stream values for global indices ``offset .. offset + n - 1``.

    Counter ``(i lo, i hi, 0, 0)``; ``u1, u2`` from words x0, x1; ``z = sqrt(-2 ln max(u1, 1e-7))
    * cos(2 pi u2)``. Each step is rounded to float32 like an fp32 kernel, with the transcendental
    functions evaluated in float64 (so the result is within a few float32 ulp of any correctly
    rounded fp32 implementation, not necessarily bit-equal).
    """
    i = np.arange(offset, offset + n, dtype=np.uint64)
    k0, k1 = key_of(seed)
    x0, x1, _, _ = philox4x32_10(i & M32, i >> SHIFT32, 0, 0, k0, k1)
    u1 = np.maximum(_uniform(x0), np.float32(1.0e-7))
    u2 = _uniform(x1)
    theta = (TWO_PI * u2).astype(np.float32)
    ln = np.log(u1.astype(np.float64)).astype(np.float32)
    r = np.sqrt((np.float32(-2.0) * ln).astype(np.float32).astype(np.float64)).astype(np.float32)
    c = np.cos(theta.astype(np.float64)).astype(np.float32)
    return (r * c).astype(np.float32)


def flat_offsets(numels: Sequence[int], start: int = 0) -> list[int]:
    """Global index of element 0 of each tensor: ``start + sum_{j<k} ceil(numel_j / 128) * 128``."""
    out, pos = [], int(start)
    for n in numels:
        out.append(pos)
        pos += -(-int(n) // BLOCK) * BLOCK
    return out


def subset_sum_table(cs: Sequence[np.float32]) -> np.ndarray:
    """float32 array of ``2**len(cs)`` subset sums, built one numpy.float32 scalar at a time.

    ``table[m] = (bit 0 of m ? c_0 : -c_0)``, then for ``j = 1 .. len(cs)-1``
    ``table[m] = table[m] + (bit j of m ? c_j : -c_j)``, each add rounded to float32.
    """
    cs = [np.float32(c) for c in cs]
    table = np.empty(2 ** len(cs), dtype=np.float32)
    for m in range(2 ** len(cs)):
        t = cs[0] if m & 1 else -cs[0]
        for j in range(1, len(cs)):
            t = np.float32(t + (cs[j] if (m >> j) & 1 else -cs[j]))
        table[m] = t
    return table


def rademacher_acc(bits: Sequence[np.ndarray], coeffs: Sequence[float], n: int,
                   group: int = SUM_GROUP, reverse_groups: bool = False) -> np.ndarray:
    """float32 ``acc`` of the grouped order from per-seed sign bits (``bits[k][e] = 1`` iff
    ``z_k = +1``; ``n`` elements).

    Seeds ``group*g .. group*g + group - 1`` form group ``g`` (the last may be short); the element's
    index into the group's table has bit j set iff its seed ``group*g + j`` gives +1; ``acc = 0f``
    then ``acc = acc + table_g[index]`` group by group (rounded to float32 each time), in group order
    (or reversed, for the order-sensitivity guard). ``group = 1`` is the plain seed-order sum.
    """
    K = len(coeffs)
    acc = np.zeros(n, dtype=np.float32)
    groups = [list(range(g, min(g + group, K))) for g in range(0, K, group)]
    if reverse_groups:
        groups = groups[::-1]
    for members in groups:
        table = subset_sum_table([coeffs[k] for k in members])
        idx = np.zeros(n, dtype=np.int64)
        for j, k in enumerate(members):
            idx |= bits[k].astype(np.int64) << j
        acc = (acc + table[idx]).astype(np.float32)
    return acc


def apply_seeds_fp32(values: Sequence[np.ndarray], seeds: Sequence[int], coeffs: Sequence[float],
                     decay: float = 1.0, dist: str = "rademacher",
                     start: int = 0, *, group: int = SUM_GROUP,
                     reverse_groups: bool = False) -> list[np.ndarray]:
    """Expected float32 result of ``apply_seeds_`` on flat float32 arrays (returns new arrays).

    Rademacher: ``acc`` in the grouped order (:func:`rademacher_acc`; ``group`` and
    ``reverse_groups`` select other orders for tests only). Gaussian: ``acc = 0f; for k: acc = acc +
    c_k * z_k`` in seed order, product rounded to float32 first. Each step is rounded to float32;
    then ``p * float32(decay)`` (skipped when decay == 1) rounded to float32, plus ``acc``, rounded
    to float32. The caller rounds the float32 result to bfloat16/float16 once when checking those
    dtypes.
    """
    bases = flat_offsets([v.size for v in values], start)
    cs = [np.float32(c) for c in coeffs]
    out = []
    for v, base in zip(values, bases):
        n = v.size
        if dist == "rademacher":
            bits = [rademacher_bits(s, n, base) for s in seeds]
            acc = rademacher_acc(bits, cs, n, group, reverse_groups)
        else:
            acc = np.zeros(n, dtype=np.float32)
            for s, c in zip(seeds, cs):
                term = (c * gaussian(s, n, base)).astype(np.float32)
                acc = (acc + term).astype(np.float32)
        p = np.asarray(v, dtype=np.float32).reshape(-1)
        if float(decay) != 1.0:
            p = (p * np.float32(decay)).astype(np.float32)
        out.append((p + acc).astype(np.float32))
    return out
