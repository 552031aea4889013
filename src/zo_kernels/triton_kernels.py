"""Triton backend of ``apply_seeds_`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

One program covers ``NB`` whole noise blocks (``NB * 128`` consecutive global indices, aligned to the
block grid), so every Philox call serves a full row of 128 elements: the tile is ``[NB, 128]``, the
four Philox words of a row are computed once per seed (``tl.philox`` on uint32 counters, exactly
stream v1) and each element picks its bit. Elements of the tile outside the tensor are masked.

Seeds are looped inside the kernel, so K seeds cost one read and one write of the tensor. The
accumulation order is the contract's (DESIGN section 4, ``reference`` module docstring):

- Rademacher, grouped order: for each group ``g`` of 4 seeds (``4g .. 4g+3``, the last group may be
  short) each element builds a 4-bit index from its 4 sign bits (bit j set iff ``z_{4g+j} = +1``)
  and adds ``T_g[idx]``, gathered from the subset-sum tables that the wrapper computes on the host
  with :func:`zo_kernels.reference.group_tables` (float32, flattened ``[G * 16]``):
  ``acc = 0f; for g: acc = acc + T_g[idx_g]``.
- Gaussian, seed order: ``acc = 0f; for k: acc = acc + c_k * z_k``.

The multiply-add ``p * decay + acc`` is kept unfused (``enable_fp_fusion=False``) so the result
matches the CPU bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference as _ref

NB_DEFAULT = 8  # blocks per program: 1024 elements
SUM_GROUP = _ref.SUM_GROUP
assert SUM_GROUP == 4, "the kernel builds 4-bit table indices"


@triton.jit
def _apply_seeds_kernel(x_ptr, n, base, seeds_ptr, coeffs_ptr, tables_ptr, K, G, decay,
                        APPLY_DECAY: tl.constexpr, GAUSSIAN: tl.constexpr, IS_BF16: tl.constexpr,
                        NB: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    first_block = base // 128
    rows = first_block + pid * NB + tl.arange(0, NB).to(tl.int64)          # global block ids [NB]
    j = tl.arange(0, 128)                                                   # bit within block [128]
    gidx = rows[:, None] * 128 + j[None, :].to(tl.int64)                    # global index [NB,128]
    e = gidx - base                                                         # element index
    mask = (e >= 0) & (e < n)
    acc = tl.zeros((NB, 128), dtype=tl.float32)
    if GAUSSIAN:
        lo = (gidx & 0xFFFFFFFF).to(tl.uint32)
        hi = (gidx >> 32).to(tl.uint32)
        zero = tl.zeros((NB, 128), dtype=tl.uint32)
        for k in range(K):                                                  # seed order
            seed = tl.load(seeds_ptr + k).to(tl.uint64, bitcast=True)
            c = tl.load(coeffs_ptr + k)
            x0, x1, _, _ = tl.philox(seed, lo, hi, zero, zero)
            u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(x0))
            u2 = tl.uint_to_uniform_float(x1)
            z = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
            acc = acc + c * z
    else:
        b_lo = (rows & 0xFFFFFFFF).to(tl.uint32)
        b_hi = (rows >> 32).to(tl.uint32)
        zero_row = tl.zeros((NB,), dtype=tl.uint32)
        q = (j >> 5)[None, :]                                               # word of each bit
        sh = (j & 31).to(tl.uint32)[None, :]                                # bit within the word
        for g in range(G):                                                  # groups in order
            idx = tl.zeros((NB, 128), dtype=tl.int32)
            for jj in tl.static_range(4):                                   # seeds 4g .. 4g+3
                k = g * 4 + jj
                valid = k < K                                               # short last group
                seed = tl.load(seeds_ptr + tl.minimum(k, K - 1)).to(tl.uint64, bitcast=True)
                x0, x1, x2, x3 = tl.philox(seed, b_lo, b_hi, zero_row, zero_row)
                w = tl.where(q == 0, x0[:, None],
                             tl.where(q == 1, x1[:, None], tl.where(q == 2, x2[:, None], x3[:, None])))
                bit = ((w >> sh) & 1).to(tl.int32)
                bit = tl.where(valid, bit, 0)
                idx = idx | (bit << jj)
            acc = acc + tl.load(tables_ptr + g * 16 + idx)                  # one fp32 add per group
    p = tl.load(x_ptr + e, mask=mask, other=0.0).to(tl.float32)
    if APPLY_DECAY:
        p = p * decay
    p = p + acc
    if IS_BF16:
        # Round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates, and
        # this form is the same on every target. NaN stays NaN (quiet NaN 0x7FC0, as torch).
        bits = p.to(tl.uint32, bitcast=True)
        r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        r = tl.where(p != p, 0x7FC0, r).to(tl.uint16)
        tl.store(x_ptr + e, r.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(x_ptr + e, p.to(x_ptr.dtype.element_ty), mask=mask)


def apply_seeds_triton(tensors, seeds, coeffs, bases, decay: float, dist: str, nb: int = NB_DEFAULT):
    """Launch the kernel once per tensor. ``seeds`` int64 and ``coeffs`` float32 (any device; moved
    to the tensors' device), ``bases`` the global index of each tensor's element 0. For Rademacher
    noise the subset-sum tables are computed on the host (``reference.group_tables``) and moved to
    the device once per call."""
    if not tensors:
        return
    dev = tensors[0].device
    seeds_d = seeds.to(dev)
    coeffs_d = coeffs.to(dev)
    K = int(seeds_d.numel())
    gaussian = dist == "gaussian"
    if gaussian:
        tables_d, G = coeffs_d, 0  # unused by the Gaussian path
    else:
        tables = _ref.group_tables(coeffs.detach().to("cpu", torch.float32))
        G = int(tables.shape[0])
        tables_d = tables.reshape(-1).contiguous().to(dev)
        if G == 0:
            tables_d = torch.zeros(16, dtype=torch.float32, device=dev)  # never read (K = 0)
    kwargs = {}
    if dev.type == "cuda":
        kwargs["enable_fp_fusion"] = False
    for t, base in zip(tensors, bases):
        n = t.numel()
        if n == 0:
            continue
        nblocks = (base + n - 1) // 128 - base // 128 + 1
        grid = (triton.cdiv(nblocks, nb),)
        _apply_seeds_kernel[grid](t, n, base, seeds_d, coeffs_d, tables_d, K, G, float(decay),
                                  APPLY_DECAY=float(decay) != 1.0, GAUSSIAN=gaussian,
                                  IS_BF16=t.dtype == torch.bfloat16,
                                  NB=nb, **kwargs)
