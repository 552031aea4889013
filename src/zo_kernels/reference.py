"""Pure-torch reference implementation of noise stream v1 and of ``apply_seeds_``.

This is the executable form of the contract in docs/DESIGN.md, "Noise stream" and "Grouped summation order". It runs on any device that
torch runs on, works in chunks of ``CHUNK`` elements so its own extra memory is bounded by
:func:`chunk_bytes` (a few tens of MB) whatever the model size, and is the path used when the
compiled extension is missing.

Accumulation order of ``apply_seeds_`` (every backend follows it; with Rademacher noise the results
are bit-identical on every backend):

- Gaussian: ``acc = 0f; for k: acc = acc + c_k * z_k`` (product and sum rounded to fp32, in order).
- Rademacher ("grouped order", ``SUM_GROUP = 4`` seeds per group): the seeds are split into groups
  ``g`` of 4 consecutive seeds (the last group may be short); :func:`group_tables` builds, per group,
  the 16 subset sums ``T_g[m] = (+-c_{4g}) + (+-c_{4g+1}) + ...`` (fp32, left to right, ``+c`` where
  bit j of m is set); then ``acc = 0f; for g: acc = acc + T_g[idx_g(i)]`` where bit j of
  ``idx_g(i)`` is 1 iff ``z_{4g+j}(i) = +1``. For K <= 5 this equals the plain seed-order sum.

All unsigned 32-bit arithmetic is emulated in int64: a 32x32-bit product is split into two 16-bit
halves of the multiplier so no intermediate exceeds 2**49 (int64 would overflow on the full product).
"""
from __future__ import annotations

from typing import Sequence

import torch

# Philox4x32-10 constants (Triton's round constants and output order).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
N_ROUNDS = 10
BLOCK = 128  # elements per Philox call for Rademacher noise (4 words x 32 bits)
MASK32 = 0xFFFFFFFF

#: Elements processed per chunk by the reference path (bounded extra memory: see chunk_bytes()).
CHUNK = 1 << 18
#: Chunk of the Gaussian path: its per-element Philox needs several times the temporaries.
GAUSS_CHUNK = CHUNK // 4
#: Seeds per subset-sum table in the Rademacher accumulation order (docs/DESIGN.md, "Grouped summation order").
SUM_GROUP = 4

UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit words
TWO_PI = 6.283185307179586


def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of x * m for int64 tensors holding uint32 values and a uint32 constant."""
    mh, ml = m >> 16, m & 0xFFFF
    a = x * mh  # < 2**48
    b = x * ml  # < 2**48
    hi = (a + (b >> 16)) >> 16
    lo = (((a & 0xFFFF) << 16) + b) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 words; key words are Python ints.

    Returns the four output words (int64 tensors holding uint32 values), in Triton's order.
    """
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _key(seed: int) -> tuple[int, int]:
    seed &= (1 << 64) - 1
    return seed & MASK32, seed >> 32


def rademacher_signs(seed: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """Bool tensor of length n: True where z_i = +1, for global indices start .. start+n-1.

    One Philox call per 128-element block (as the contract defines), then each element takes bit
    (i % 32) of word (i % 128) // 32 of its block.
    """
    b0, b1 = start >> 7, (start + n - 1) >> 7
    b = torch.arange(b0, b1 + 1, dtype=torch.int64, device=device)
    k0, k1 = _key(seed)
    zero = torch.zeros_like(b)
    words = torch.stack(philox4x32_10(b & MASK32, b >> 32, zero, zero, k0, k1), dim=1)  # [nb, 4]
    j = torch.arange(BLOCK, device=device)
    bits = (words[:, j >> 5] >> (j & 31)) & 1                                           # [nb, 128]
    lo = start - (b0 << 7)
    return bits.reshape(-1)[lo:lo + n].bool()


def _uniform(x: torch.Tensor) -> torch.Tensor:
    # bitcast uint32 -> int32, then x < 0 ? -x - 1 : x, times the scale (all as Triton does).
    s = torch.where(x >= (1 << 31), x - (1 << 32), x)
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def gaussian_values(seed: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """float32 Gaussian noise of stream v1 for global indices start .. start+n-1."""
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    k0, k1 = _key(seed)
    zero = torch.zeros_like(i)
    x0, x1, _, _ = philox4x32_10(i & MASK32, i >> 32, zero, zero, k0, k1)
    u1 = torch.clamp_min(_uniform(x0), 1.0e-7)
    u2 = _uniform(x1)
    th = torch.tensor(TWO_PI, dtype=torch.float32, device=device) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th)


def noise_chunk(seed: int, start: int, n: int, dist: str, device="cpu") -> torch.Tensor:
    """float32 values z_i (±1 or Gaussian) for global indices start .. start+n-1."""
    if dist == "rademacher":
        s = rademacher_signs(seed, start, n, device)
        return torch.where(s, 1.0, -1.0).to(torch.float32)
    return gaussian_values(seed, start, n, device)


def group_tables(coeffs) -> torch.Tensor:
    """Subset-sum tables of the Rademacher accumulation order: float32 CPU tensor [ceil(K/4), 16].

    ``coeffs``: K coefficients (floats or a float tensor; each rounded to float32 once). Group ``g``
    holds seeds ``4g .. min(4g+4, K)-1`` (``n_g`` of them; the last group may be short) and::

        T[g, m] = (bit 0 of m ? c_4g : -c_4g)
        for j in 1 .. n_g-1:  T[g, m] = T[g, m] + (bit j of m ? c_{4g+j} : -c_{4g+j})   # fp32, RNE

    Bits of ``m`` at or above ``n_g`` are never consulted, so in a short group
    ``T[g, m] == T[g, m & (2**n_g - 1)]`` (those entries are never used). K = 0 gives shape [0, 16].
    """
    if isinstance(coeffs, torch.Tensor):
        c = coeffs.detach().reshape(-1).to("cpu", torch.float32)
    else:
        c = torch.tensor([float(v) for v in coeffs], dtype=torch.float32)
    K = c.numel()
    G = -(-K // SUM_GROUP)
    m = torch.arange(16, dtype=torch.int64)
    out = torch.empty(G, 16, dtype=torch.float32)
    for g in range(G):
        t = None
        for j in range(min(SUM_GROUP, K - SUM_GROUP * g)):
            cj = c[SUM_GROUP * g + j]
            term = torch.where(((m >> j) & 1).bool(), cj, -cj)   # float32, exact (a sign flip)
            t = term if t is None else t + term                   # one fp32 add per element
        out[g] = t
    return out


def apply_seeds_reference(tensors: Sequence[torch.Tensor], bases: Sequence[int], seeds: Sequence[int],
                          coeffs: Sequence[float], decay: float, dist: str) -> None:
    """In-place ``p = to_dtype(float(p) * decay + acc)``, ``acc`` in fp32 in the contract's order.

    Rademacher: ``acc = 0f; for g in groups: acc = acc + T_g[idx_g(i)]`` with ``T = group_tables``
    and bit j of ``idx_g(i)`` set iff ``z_{4g+j}(i) = +1`` (see the module docstring). Gaussian:
    ``acc = 0f; for k: acc = acc + c_k * z_k`` in seed order. ``decay == 1`` skips the multiply.

    ``tensors`` must be contiguous; ``bases[t]`` is the global index of element 0 of ``tensors[t]``.
    Works chunk by chunk, so the extra memory is O(CHUNK + K) (:func:`chunk_bytes`), not O(model);
    results do not depend on the chunking (every element's arithmetic is its own).
    """
    seeds = list(seeds)
    cf = torch.tensor([float(c) for c in coeffs], dtype=torch.float32)
    tables = group_tables(cf) if dist == "rademacher" else None
    for t, base in zip(tensors, bases):
        flat = t.view(-1)
        n = flat.numel()
        dev = t.device
        if dist == "rademacher":
            tab_dev = tables.to(dev)
        else:
            cdev = [c.to(dev) for c in cf]
        step = CHUNK if dist == "rademacher" else GAUSS_CHUNK
        for s in range(0, n, step):
            m = min(step, n - s)
            acc = torch.zeros(m, dtype=torch.float32, device=dev)
            if dist == "rademacher":
                idx = torch.empty(m, dtype=torch.int32, device=dev)
                for g in range(tab_dev.shape[0]):
                    idx.zero_()
                    for j, seed in enumerate(seeds[SUM_GROUP * g:SUM_GROUP * (g + 1)]):
                        idx.add_(rademacher_signs(seed, base + s, m, dev), alpha=1 << j)
                    acc.add_(torch.index_select(tab_dev[g], 0, idx))  # one fp32 add per group
            else:
                for seed, c in zip(seeds, cdev):
                    acc = acc + c * gaussian_values(seed, base + s, m, dev)  # seed order
            seg = flat[s:s + m]
            p = seg.to(torch.float32)
            if decay != 1.0:
                p = p * torch.tensor(decay, dtype=torch.float32, device=dev)
            seg.copy_((p + acc).to(t.dtype))


def chunk_bytes(num_seeds: int = 0) -> int:
    """Upper bound on the reference path's working memory per call, in bytes.

    A dozen int64 temporaries of one ``CHUNK``, plus the subset-sum tables (16 floats per 4 seeds)
    and the per-seed coefficient scalars for ``num_seeds`` seeds. The Rademacher path's temporaries
    per chunk are the sign-bit extraction of one seed (three int64 arrays), the int32 table index,
    ``acc`` and the gathered table values; the Gaussian path's per-element Philox needs about four
    times that, so it works in chunks of ``GAUSS_CHUNK = CHUNK / 4``. Measured peak RSS growth on
    4M float32 elements (glibc allocator): Rademacher 8 MiB (K = 1) to 18 MiB (K = 8), Gaussian
    19 MiB, against 24 MiB here.
    """
    return CHUNK * 8 * 12 + 64 * num_seeds


__all__ = ["philox4x32_10", "rademacher_signs", "gaussian_values", "noise_chunk", "group_tables",
           "apply_seeds_reference", "CHUNK", "GAUSS_CHUNK", "BLOCK", "SUM_GROUP", "chunk_bytes"]
