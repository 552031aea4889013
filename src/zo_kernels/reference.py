"""Pure-torch reference implementation of noise stream v1 and of ``apply_seeds_``.

This is the executable form of the contract in DESIGN section 3 and 4. It runs on any device that
torch runs on, works in chunks so its own extra memory is bounded by ``CHUNK`` elements (a few MB)
whatever the model size, and is the path used when the compiled extension is missing.

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

#: Elements processed per chunk by the reference path (bounded extra memory: ~20 bytes/element).
CHUNK = 1 << 18

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


def apply_seeds_reference(tensors: Sequence[torch.Tensor], bases: Sequence[int], seeds: Sequence[int],
                          coeffs: Sequence[float], decay: float, dist: str) -> None:
    """In-place ``p = to_dtype(float(p) * decay + acc)`` with ``acc = sum_k c_k z_k`` in fp32, in order.

    ``tensors`` must be contiguous; ``bases[t]`` is the global index of element 0 of ``tensors[t]``.
    Works chunk by chunk, so the extra memory is O(CHUNK), not O(model).
    """
    cf = [torch.tensor(float(c), dtype=torch.float32) for c in coeffs]
    for t, base in zip(tensors, bases):
        flat = t.view(-1)
        n = flat.numel()
        dev = t.device
        cdev = [c.to(dev) for c in cf]
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            acc = torch.zeros(m, dtype=torch.float32, device=dev)
            for seed, c in zip(seeds, cdev):
                if dist == "rademacher":
                    sign = rademacher_signs(seed, base + s, m, dev)
                    acc = acc + torch.where(sign, c, -c)  # one fp32 add per seed, in order
                else:
                    acc = acc + c * gaussian_values(seed, base + s, m, dev)
            seg = flat[s:s + m]
            p = seg.to(torch.float32)
            if decay != 1.0:
                p = p * torch.tensor(decay, dtype=torch.float32, device=dev)
            seg.copy_((p + acc).to(t.dtype))


def chunk_bytes() -> int:
    """Upper bound on the reference path's working memory per call, in bytes."""
    return CHUNK * 8 * 12  # a dozen int64 temporaries of one chunk


__all__ = ["philox4x32_10", "rademacher_signs", "gaussian_values", "noise_chunk",
           "apply_seeds_reference", "CHUNK", "BLOCK", "chunk_bytes"]
