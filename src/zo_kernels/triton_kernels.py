"""Triton backend of ``apply_seeds_`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

One launch per call over the whole tensor list (a multi-tensor kernel). The host side
(:mod:`zo_kernels._gpu`) hands the kernel a device table of tensor descriptors and of tile starts,
built once per parameter list and cached:

- ``desc[4 t + 0 .. 3] = (data pointer, numel, base, dtype code)`` of tensor ``t`` (int64; dtype code
  0 float32, 1 bfloat16, 2 float16), ``base`` the global index of its element 0;
- ``tile_start[t]`` = the first program of tensor ``t`` (int64, ``T + 1`` entries): tensor ``t``
  owns ``cdiv(its noise blocks, NB)`` programs, each covering ``NB`` whole 128-element noise blocks
  aligned to the block grid. A program finds its tensor by a binary search of ``LOG_T`` steps.

The element tile is ``[NB, 4, 4, 8]``: row ``r`` (noise block), word ``q``, byte ``m``, bit ``u``,
so element ``j = 32 q + 8 m + u`` of a block takes bit ``8 m + u`` of Philox word ``q`` (stream v1,
``docs/DESIGN.md``, "Noise stream"); the innermost 8 elements are contiguous in memory, so loads and
stores of aligned tensors vectorize (128-bit accesses).

Rademacher, grouped order (``docs/DESIGN.md``, "Grouped summation order"): per group ``g`` of
``SUM_GROUP = 4`` seeds, Philox runs once per (row, seed) on a compact ``[NB, GS]`` tensor (``GS`` the
seeds per group: 1 or 2 for K = 1, 2, else 4), not once per element. The 4 words of the group's
seeds are then bit-transposed in that compact domain into "nibble words" ``N[r, q, m]`` (nibble
``u`` = the group's 4 sign bits of element ``32 q + 8 m + u``), so each element needs one shift, one
mask and one gather of the group's subset-sum table: ``acc = acc + T_g[(N >> 4u) & 15]``. The
compact tensors have their own layout and reach the element layout through one layout conversion
(shared memory on a GPU). The tables (float32 ``[G * 16]``) come from the host or from
``_tables_kernel`` (device coefficients).

Gaussian, seed order: ``acc = 0f; for k: acc = acc + c_k * z_k`` with one Philox per element and
seed (``tl.sqrt_rn``; ``log``/``cos`` are the device's, so agreement is within 1e-6 relative).

The multiply-add ``p * decay + acc`` is kept unfused (``enable_fp_fusion=False``). Stores round to
bfloat16 by hand (the interpreter's cast truncates) and write NaN with the CPU kernel's bits
(float32: the old NaN quieted, or x86's default NaN; bfloat16 ``0x7FC0``; float16 sign | ``0x7E00``)
instead of the GPU's canonical NaN, so NaN and inf bit patterns match the CPU on every target.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import reference as _ref

SUM_GROUP = _ref.SUM_GROUP
assert SUM_GROUP == 4, "the kernel builds 4-bit table indices"
#: Noise blocks (rows of 128 elements) per program, Rademacher: 4096 elements, so a group's compact
#: Philox tensor [NB, 4] has 128 entries, one per thread of a 4-warp program.
NB_RADEMACHER = 32
#: Noise blocks per program, Gaussian (Philox per element: smaller tiles keep registers low).
NB_GAUSSIAN = 8
NUM_WARPS = 4
#: dtype codes of the descriptor table (same numbering as the CPU kernel's ``DType``).
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _ptr(raw, ELEM: tl.constexpr, ALIGNED: tl.constexpr):
    """The int64 address ``raw`` as a pointer to ``ELEM``; with ``ALIGNED`` it is declared 16-byte
    aligned (the hint must sit on the pointer itself for the 128-bit accesses to be emitted)."""
    p = raw.to(tl.pointer_type(ELEM))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _load_f32(raw, e, mask, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements ``e`` of the tensor at address ``raw`` (int64): ``(value as float32, nanq)`` where
    ``nanq`` (uint32) is the float32 bit pattern x86 gives a NaN computed from this element (the
    element quieted, sign and payload kept; float16 keeps only the sign). 16-bit elements are read
    as raw bits, so the sign of a NaN survives the device's conversion."""
    if CODE == 0:
        v = tl.load(_ptr(raw, tl.float32, ALIGNED) + e, mask=mask, other=0.0)
        nanq = v.to(tl.uint32, bitcast=True) | 0x400000
    elif CODE == 1:
        h = tl.load(_ptr(raw, tl.uint16, ALIGNED) + e, mask=mask, other=0).to(tl.uint32)
        nanq = (h << 16) | 0x400000
        v = (h << 16).to(tl.float32, bitcast=True)
    else:
        h = tl.load(_ptr(raw, tl.uint16, ALIGNED) + e, mask=mask, other=0)
        v = h.to(tl.float16, bitcast=True).to(tl.float32)
        nanq = ((h.to(tl.uint32) & 0x8000) << 16) | 0x7FC00000
    return v, nanq


@triton.jit
def _store_f32(raw, e, mask, p, x, nanq, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """Round ``p`` (float32) to the tensor's dtype and store it, with the bits the CPU kernel
    writes: a NaN result is ``nanq`` when the old value ``x`` was NaN, else x86's default NaN
    ``0xFFC00000`` (a GPU's arithmetic would give ``0x7FFFFFFF``); then bfloat16 rounds to nearest
    even by hand with NaN as ``0x7FC0``, float16 NaN as sign | ``0x7E00`` (torch's conversions)."""
    pb = p.to(tl.uint32, bitcast=True)
    pb = tl.where(p != p, tl.where(x != x, nanq, 0xFFC00000), pb)
    if CODE == 0:
        tl.store(_ptr(raw, tl.uint32, ALIGNED) + e, pb, mask=mask)
    elif CODE == 1:
        r = ((pb + 0x7FFF + ((pb >> 16) & 1)) >> 16).to(tl.uint16)
        r = tl.where(p != p, 0x7FC0, r).to(tl.uint16)
        tl.store(_ptr(raw, tl.uint16, ALIGNED) + e, r, mask=mask)
    else:
        h = p.to(tl.float16).to(tl.uint16, bitcast=True)
        h = tl.where(p != p, ((pb >> 16) & 0x8000) | 0x7E00, h).to(tl.uint16)
        tl.store(_ptr(raw, tl.uint16, ALIGNED) + e, h, mask=mask)


@triton.jit
def _rademacher_acc(rows, seeds_ptr, tables_ptr, K, G, NB: tl.constexpr, GS: tl.constexpr,
                    SUM_GROUP: tl.constexpr):
    """float32 ``acc`` [NB, 4, 4, 8] of the grouped order for the NB noise blocks ``rows``."""
    q = tl.arange(0, 4)
    m = tl.arange(0, 4)
    u = tl.arange(0, 8)
    jj = tl.arange(0, GS)
    b_lo = (rows & 0xFFFFFFFF).to(tl.uint32)
    b_hi = (rows >> 32).to(tl.uint32)
    c0 = b_lo[:, None] + tl.zeros((NB, GS), dtype=tl.uint32)                # counter (b_lo, b_hi,
    c1 = b_hi[:, None] + tl.zeros((NB, GS), dtype=tl.uint32)                #  0, 0) per row/seed
    zero = tl.zeros((NB, GS), dtype=tl.uint32)
    shift_m = (8 * m).to(tl.uint32)[None, None, None, :]
    shift_u = (4 * u).to(tl.uint32)[None, None, None, :]
    acc = tl.zeros((NB, 4, 4, 8), dtype=tl.float32)
    for g in range(G):                                                      # groups in order
        kk = g * SUM_GROUP + jj
        valid = kk < K                                                      # short last group
        seed = tl.load(seeds_ptr + kk, mask=valid, other=0).to(tl.uint64, bitcast=True)
        # One Philox per (row, seed): [NB, GS] each word.
        x0, x1, x2, x3 = tl.philox(seed[None, :], c0, c1, zero, zero)
        w = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), [NB, GS, 4])  # word q, q=0..3
        w = tl.where(valid[None, :, None], w, 0)
        # Bit-transpose in the compact domain: byte m of word q of seed jj -> bits 4u + jj.
        x = (w[:, :, :, None] >> shift_m) & 0xFF                            # [NB, GS, 4q, 4m]
        x = (x | (x << 12)) & 0x000F000F
        x = (x | (x << 6)) & 0x03030303
        x = (x | (x << 3)) & 0x11111111                                     # bit i -> bit 4i
        x = x << jj.to(tl.uint32)[None, :, None, None]
        nib = tl.reduce(x, 1, _or)                                          # [NB, 4q, 4m]
        idx = ((nib[:, :, :, None] >> shift_u) & 0xF).to(tl.int32)          # [NB, 4, 4, 8]
        acc = acc + tl.load(tables_ptr + g * 16 + idx)                      # one fp32 add/group
    return acc


@triton.jit
def _gaussian_acc(rows, seeds_ptr, coeffs_ptr, K, NB: tl.constexpr):
    """float32 ``acc`` [NB, 4, 4, 8] of the seed order (Gaussian) for the noise blocks ``rows``."""
    q = tl.arange(0, 4)
    m = tl.arange(0, 4)
    u = tl.arange(0, 8)
    j = q[:, None, None] * 32 + m[None, :, None] * 8 + u[None, None, :]
    gidx = rows[:, None, None, None] * 128 + j[None, :, :, :].to(tl.int64)
    lo = (gidx & 0xFFFFFFFF).to(tl.uint32)
    hi = (gidx >> 32).to(tl.uint32)
    zero = tl.zeros((NB, 4, 4, 8), dtype=tl.uint32)
    acc = tl.zeros((NB, 4, 4, 8), dtype=tl.float32)
    for k in range(K):                                                      # seed order
        seed = tl.load(seeds_ptr + k).to(tl.uint64, bitcast=True)
        c = tl.load(coeffs_ptr + k)
        x0, x1, _, _ = tl.philox(seed, lo, hi, zero, zero)
        u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(x0))
        u2 = tl.uint_to_uniform_float(x1)
        z = tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
        acc = acc + c * z
    return acc


@triton.jit
def apply_seeds_kernel(desc_ptr, tile_ptr, T, seeds_ptr, coeffs_ptr, tables_ptr, K, G, decay,
                       LOG_T: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                       APPLY_DECAY: tl.constexpr, GAUSSIAN: tl.constexpr, GS: tl.constexpr,
                       NB: tl.constexpr, SUM_GROUP: tl.constexpr):
    """One program: NB noise blocks of one tensor. ``DTYPE`` 0/1/2 when every tensor has that dtype,
    -1 for a mixed list (then a runtime branch per program). ``ALIGNED``: every tensor's address is
    16-byte aligned and its numel and base are multiples of 16 (hints that allow 128-bit accesses)."""
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0
    hi = lo + T
    for _ in tl.static_range(LOG_T):                 # largest t with tile_start[t] <= pid
        mid = (lo + hi) // 2
        go = tl.load(tile_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    t = lo
    raw = tl.load(desc_ptr + 4 * t)
    n = tl.load(desc_ptr + 4 * t + 1)
    base = tl.load(desc_ptr + 4 * t + 2)
    first_row = base // 128 + (pid - tl.load(tile_ptr + t)) * NB
    start = first_row * 128 - base                   # element index of the tile's first slot
    if ALIGNED:
        n = tl.multiple_of(n, 16)
        start = tl.multiple_of(start, 16)
    r = tl.arange(0, NB)
    q = tl.arange(0, 4)
    m = tl.arange(0, 4)
    u = tl.arange(0, 8)
    offs = (r[:, None, None, None] * 128 + q[None, :, None, None] * 32
            + m[None, None, :, None] * 8 + u[None, None, None, :])
    e = start + offs
    mask = (e >= 0) & (e < n)
    # x first: its loads are in flight while the noise is computed.
    if DTYPE >= 0:
        x, nanq = _load_f32(raw, e, mask, DTYPE, ALIGNED)
    else:
        code = tl.load(desc_ptr + 4 * t + 3)
        if code == 0:
            x, nanq = _load_f32(raw, e, mask, 0, ALIGNED)
        elif code == 1:
            x, nanq = _load_f32(raw, e, mask, 1, ALIGNED)
        else:
            x, nanq = _load_f32(raw, e, mask, 2, ALIGNED)
    x_in = x
    rows = first_row + r.to(tl.int64)
    if GAUSSIAN:
        acc = _gaussian_acc(rows, seeds_ptr, coeffs_ptr, K, NB)
    else:
        acc = _rademacher_acc(rows, seeds_ptr, tables_ptr, K, G, NB, GS, SUM_GROUP)
    if APPLY_DECAY:
        x = x * decay
    p = x + acc
    if DTYPE >= 0:
        _store_f32(raw, e, mask, p, x_in, nanq, DTYPE, ALIGNED)
    else:
        if code == 0:
            _store_f32(raw, e, mask, p, x_in, nanq, 0, ALIGNED)
        elif code == 1:
            _store_f32(raw, e, mask, p, x_in, nanq, 1, ALIGNED)
        else:
            _store_f32(raw, e, mask, p, x_in, nanq, 2, ALIGNED)


@triton.jit
def tables_kernel(coeffs_ptr, tables_ptr, K, G, SUM_GROUP: tl.constexpr, GB: tl.constexpr):
    """Subset-sum tables of the grouped order from device coefficients: ``tables[16 g + mm]`` for
    the ``GB`` groups of this program (``reference.group_tables``, same bits):
    ``t = (bit 0 of mm ? c_4g : -c_4g); t = t + (bit j of mm ? c_4g+j : -c_4g+j)`` for
    ``j < n_g``."""
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    mm = tl.arange(0, 16)
    gv = g < G
    c = tl.load(coeffs_ptr + g * SUM_GROUP, mask=gv, other=0.0)
    t = tl.where((mm[None, :] & 1) != 0, c[:, None], -c[:, None])
    for j in tl.static_range(1, SUM_GROUP):
        k = g * SUM_GROUP + j
        kv = k < K
        cj = tl.load(coeffs_ptr + k, mask=gv & kv, other=0.0)
        term = tl.where(((mm[None, :] >> j) & 1) != 0, cj[:, None], -cj[:, None])
        t = tl.where(kv[:, None], t + term, t)       # a short group adds only its n_g terms
    tl.store(tables_ptr + g[:, None] * 16 + mm[None, :], t, mask=gv[:, None])
