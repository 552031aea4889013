"""Host side of the GPU backends (Triton and the CUDA extension): one launch, no synchronization.

Per call, ``apply_seeds_`` on CUDA tensors does, on the host:

1. :func:`plan_for` - look up the cached :class:`Plan` of the tensor list (keyed by device, data
   pointers, numels, dtypes and bases). A plan holds the device table of tensor descriptors
   ``(pointer, numel, base, dtype code)`` and of tile starts, copied to the device once, when the
   plan is built; later calls with the same parameters reuse it.
2. :func:`stage` - the call's seeds, and either the subset-sum tables of the grouped order (built on
   the host with batched numpy ops, :func:`group_tables_batched`, same bits as
   ``reference.group_tables``) or the coefficients, are written into one pinned host buffer and
   copied with ONE ``copy_(non_blocking=True)`` into a persistent per-(device, stream) buffer. Seeds
   and coefficients given as CUDA tensors are not copied at all: they are read on the device, and
   the tables are built there (Triton: ``tables_kernel``; CUDA extension: in shared memory).
3. one kernel launch over all tensors, under a device guard (``torch.cuda.device``) on the tensors'
   device and its current stream.

Nothing reads device memory on the host: no ``.item()``, no ``.cpu()``, no blocking copy, so the
host runs ahead of the GPU and a call can be recorded in a CUDA graph (seeds and coefficients then
must be CUDA tensors; see ``docs/DESIGN.md, "The GPU path"``).

The same code runs on CPU tensors for the Triton interpreter (``TRITON_INTERPRET=1``); the staging
buffer is then not pinned and the "device" buffer is host memory, which is how the tests check the
structure (one staging copy, one launch, no host read of device data) without a GPU.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict

import numpy as np
import torch

SUM_GROUP = 4
#: Plans kept per process (least recently used dropped first). A training loop uses 1-4 lists.
PLAN_CACHE_SIZE = 64
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_U64 = 1 << 64

# Counters read by the structural tests (cheap: one integer add per event).
STATS = {"plans_built": 0, "staging_copies": 0, "launches": 0, "table_launches": 0}


# --------------------------------------------------------------------------------------------
# subset-sum tables, batched
# --------------------------------------------------------------------------------------------
_BITS = ((np.arange(16)[:, None] >> np.arange(SUM_GROUP)[None, :]) & 1).astype(bool)  # [16, 4]


def group_tables_batched(coeffs) -> np.ndarray:
    """``reference.group_tables`` with a fixed number of batched numpy ops (about 10, whatever K).

    ``coeffs``: float32 numpy array (or anything numpy turns into one) of K coefficients.
    Returns float32 ``[ceil(K/4), 16]``: ``T[g, m] = (bit 0 of m ? c_4g : -c_4g)`` then
    ``T[g, m] = T[g, m] + (bit j of m ? c_4g+j : -c_4g+j)`` for ``j = 1 .. n_g - 1`` (fp32 adds,
    round to nearest even; a short last group adds only its ``n_g`` terms), bit for bit the
    reference's values.
    """
    c = np.asarray(coeffs, dtype=np.float32).reshape(-1)
    K = c.size
    G = -(-K // SUM_GROUP)
    if G == 0:
        return np.zeros((0, 16), dtype=np.float32)
    cp = np.zeros(G * SUM_GROUP, dtype=np.float32)
    cp[:K] = c
    cp = cp.reshape(G, 1, SUM_GROUP)
    terms = np.where(_BITS[None], cp, -cp)                           # [G, 16, 4] float32
    n_g = np.minimum(SUM_GROUP, K - SUM_GROUP * np.arange(G))[:, None]  # [G, 1]
    t = terms[:, :, 0]
    for j in range(1, SUM_GROUP):
        t = np.where(j < n_g, t + terms[:, :, j], t)                 # float32 + float32 -> fp32
    return np.ascontiguousarray(t, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# plans: cached descriptor tables per parameter list
# --------------------------------------------------------------------------------------------
class Plan:
    """What a launch over one tensor list needs, computed once per list.

    Attributes: ``device``; ``T`` (tensors); ``dtype_code`` (0/1/2 when all tensors share the
    dtype float32/bfloat16/float16, else -1); ``aligned`` (every address 16-byte aligned, every
    numel and base a multiple of 16: the vectorized specialization is valid); ``desc`` (numpy int64
    ``[T, 4]``: pointer, numel, base, dtype code). :meth:`tiles` gives the device table for a tile
    size.
    """

    __slots__ = ("device", "T", "dtype_code", "aligned", "desc", "log_t", "_tiles", "_ready")

    def __init__(self, device: torch.device, ptrs, numels, dtypes, bases):
        self.device = device
        self.T = len(ptrs)
        codes = [_DTYPE_CODE[d] for d in dtypes]
        self.dtype_code = codes[0] if len(set(codes)) == 1 else -1
        self.aligned = all(p % 16 == 0 and n % 16 == 0 and b % 16 == 0
                           for p, n, b in zip(ptrs, numels, bases))
        self.desc = np.array([[p, n, b, c] for p, n, b, c in zip(ptrs, numels, bases, codes)],
                             dtype=np.int64).reshape(self.T, 4)
        self.log_t = max(1, math.ceil(math.log2(self.T))) if self.T > 1 else 0
        self._tiles: dict = {}
        self._ready: dict = {}   # nb -> (event after the copy, device tensor, streams that use it)

    def tiles(self, nb: int, stream=None):
        """``(desc_dev, tile_start_dev, n_programs)`` for tiles of ``nb`` noise blocks: two views
        of one device int64 tensor holding ``desc`` (``4T``) then ``tile_start`` (``T + 1``;
        tensor ``t`` owns programs ``tile_start[t] .. tile_start[t+1]-1``). Built and copied once
        (one non-blocking copy from pinned memory) on the current stream ``stream`` (CUDA); a
        later call on another stream first makes that stream wait for the copy's event (no host
        wait) and records the stream on the tensor for the caching allocator."""
        hit = self._tiles.get(nb)
        if hit is not None:
            # Not while capturing a CUDA graph: waiting there on an event recorded outside the
            # capture is not allowed; capture after a synchronized warm-up call instead.
            if stream is not None and not torch.cuda.is_current_stream_capturing():
                ev, dev, seen = self._ready[nb]
                if stream.cuda_stream not in seen:
                    stream.wait_event(ev)
                    dev.record_stream(stream)
                    seen.add(stream.cuda_stream)
            return hit
        numel, base = self.desc[:, 1], self.desc[:, 2]
        nblocks = (base + numel - 1) // 128 - base // 128 + 1
        per = -(-nblocks // nb)
        tile_start = np.zeros(self.T + 1, dtype=np.int64)
        np.cumsum(per, out=tile_start[1:])
        host = _host_buffer(4 * self.T + self.T + 1, self.device)
        hv = host.numpy()
        hv[:4 * self.T] = self.desc.reshape(-1)
        hv[4 * self.T:] = tile_start
        dev = torch.empty_like(host, device=self.device)
        dev.copy_(host, non_blocking=True)
        STATS["staging_copies"] += 1
        out = (dev[:4 * self.T], dev[4 * self.T:], int(tile_start[-1]))
        if stream is not None:
            ev = torch.cuda.Event()
            ev.record(stream)
            self._ready[nb] = (ev, dev, {stream.cuda_stream})
        self._tiles[nb] = out
        return out


_plans: OrderedDict = OrderedDict()
_lock = threading.Lock()


def plan_for(ts, bases) -> Plan:
    """The cached :class:`Plan` of tensors ``ts`` (non-empty, one device) at global ``bases``."""
    ptrs = tuple(map(torch.Tensor.data_ptr, ts))
    numels = tuple(map(torch.Tensor.numel, ts))
    dtypes = tuple(t.dtype for t in ts)
    dev = ts[0].device
    key = (dev, ptrs, numels, dtypes, tuple(bases))
    with _lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    plan = Plan(dev, ptrs, numels, dtypes, [int(b) for b in bases])
    STATS["plans_built"] += 1
    with _lock:
        _plans[key] = plan
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def clear_plans() -> None:
    """Drop every cached plan (their device tables are freed with them)."""
    with _lock:
        _plans.clear()


# --------------------------------------------------------------------------------------------
# staging: one non-blocking copy per call
# --------------------------------------------------------------------------------------------
def _host_buffer(n_words: int, device: torch.device) -> torch.Tensor:
    """int64 host buffer of ``n_words``; pinned (torch's caching host allocator, which keeps a
    block until the copies that read it have run) when the destination is a CUDA device."""
    return torch.empty(n_words, dtype=torch.int64, pin_memory=device.type == "cuda")


_dev_buffers: dict = {}
#: Held from staging to launch: two Python threads on one stream must not interleave their copies
#: into the shared device buffer between another call's copy and its kernel.
_launch_lock = threading.Lock()


def _current_stream(device: torch.device):
    """The current stream of ``device`` (CUDA), else None."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _device_buffer(device: torch.device, n_words: int) -> torch.Tensor:
    """The persistent int64 buffer of ``device`` and its current stream, at least ``n_words``.

    One per (device, stream): calls on one stream are ordered, so the next call's copy into the
    buffer runs after the previous call's kernel has read it. Grown by doubling; the old buffer is
    freed through the caching allocator, which orders its reuse on the same stream.
    """
    stream = (torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    key = (device, stream)
    buf = _dev_buffers.get(key)
    if buf is None or buf.numel() < n_words:
        size = max(256, 1 << max(0, n_words - 1).bit_length())
        buf = torch.empty(size, dtype=torch.int64, device=device)
        _dev_buffers[key] = buf
    return buf


class Staged:
    """Device views for one call: ``seeds`` (int64 ``[K]``), ``coeffs`` (float32 ``[K]`` or None),
    ``tables`` (float32 ``[16 G]`` or None); ``any_buffer`` a valid device tensor for unused
    pointer arguments."""

    __slots__ = ("seeds", "coeffs", "tables", "any_buffer")


def stage(device: torch.device, seeds: torch.Tensor, coeffs: torch.Tensor, *, want_tables: bool,
          want_coeffs: bool, scalars_on_device: bool | None = None) -> Staged:
    """Put the call's scalars on ``device`` with at most one non-blocking copy.

    ``seeds`` int64 ``[K]`` and ``coeffs`` float32 ``[K]``, each on the CPU or already on
    ``device``. Host values are packed into one pinned buffer ``[seeds | tables | coeffs]`` (int64
    words; float32 parts two per word) and copied once into the persistent device buffer.
    ``want_tables``: the grouped order's tables are needed; from host coefficients they are built on
    the host (:func:`group_tables_batched`), from device coefficients ``tables`` stays None (the
    caller builds them on the device). ``want_coeffs``: the coefficients themselves are needed.
    ``scalars_on_device``: None decides by ``.device``; True treats both as already on ``device``
    (the interpreter tests use it to run the device path on CPU tensors).
    """
    K = int(seeds.numel())
    G = -(-K // SUM_GROUP)
    if scalars_on_device is None:
        s_host, c_host = seeds.device.type == "cpu", coeffs.device.type == "cpu"
    else:
        s_host = c_host = not scalars_on_device
    n_seed = K if s_host else 0
    n_tab = 8 * G if (want_tables and c_host) else 0
    n_coef = (K + 1) // 2 if (want_coeffs and c_host) else 0
    n_words = n_seed + n_tab + n_coef
    out = Staged()
    out.seeds = None if s_host else seeds
    out.coeffs = None if (c_host or not want_coeffs) else coeffs
    out.tables = None
    buf = _device_buffer(device, n_words)
    out.any_buffer = buf
    if n_words:
        host = _host_buffer(n_words, device)
        hv = host.numpy()
        if n_seed:
            hv[:n_seed] = seeds.numpy()
        if n_tab:
            hv[n_seed:n_seed + n_tab].view(np.float32)[:] = group_tables_batched(
                coeffs.numpy()).reshape(-1)
        if n_coef:
            fv = hv[n_seed + n_tab:].view(np.float32)
            fv[:K] = coeffs.numpy()
            fv[K:] = 0.0
        dst = buf[:n_words]
        dst.copy_(host, non_blocking=True)
        STATS["staging_copies"] += 1
        if n_seed:
            out.seeds = dst[:n_seed]
        if n_tab:
            out.tables = dst[n_seed:n_seed + n_tab].view(torch.float32)
        if n_coef:
            out.coeffs = dst[n_seed + n_tab:].view(torch.float32)[:K]
    if out.seeds is None:  # K = 0
        out.seeds = buf[:0]
    return out


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA tensors (kernels launch on that device and its
    current stream, whatever the current device is); nothing for CPU tensors (interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_scalars_device(seeds: torch.Tensor, coeffs: torch.Tensor, device: torch.device,
                         fn: str = "apply_seeds_") -> None:
    """Seeds/coefficients must be on the CPU or on the tensors' device (checked without a sync)."""
    for name, v in (("seeds", seeds), ("coeffs", coeffs)):
        if v.device.type != "cpu" and v.device != device:
            raise ValueError(f"{fn}: {name} is on {v.device} but the tensors are on {device}; "
                             "pass it on the CPU or on the tensors' device")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_capture(seeds, coeffs, device, fn="apply_seeds_"):
    if _capturing(device) and (seeds.device.type == "cpu" or coeffs.device.type == "cpu"):
        raise RuntimeError(f"{fn}: during CUDA graph capture seeds and coeffs must be CUDA "
                           "tensors (a graph replays the copy from the host buffer it captured, "
                           "whose contents are gone by then); see docs/DESIGN.md, 'The GPU path'")


# --------------------------------------------------------------------------------------------
# launches
# --------------------------------------------------------------------------------------------
def run_triton(ts, seeds, coeffs, bases, decay: float, dist: str, *,
               scalars_on_device: bool | None = None) -> None:
    """One Triton launch over ``ts`` (plus one ``tables_kernel`` launch when the coefficients are a
    CUDA tensor). ``seeds`` int64 / ``coeffs`` float32, each on the CPU or the tensors' device;
    ``scalars_on_device`` as for :func:`stage`."""
    from . import triton_kernels as tk

    if not ts:
        return
    dev = ts[0].device
    check_scalars_device(seeds, coeffs, dev)
    _check_capture(seeds, coeffs, dev)
    gaussian = dist == "gaussian"
    K = int(seeds.numel())
    G = -(-K // SUM_GROUP)
    nb = tk.NB_GAUSSIAN if gaussian else tk.NB_RADEMACHER
    plan = plan_for(ts, bases)
    kw = {"num_warps": tk.NUM_WARPS}
    if dev.type == "cuda":
        kw["enable_fp_fusion"] = False
    with device_guard(dev), _launch_lock:
        desc_d, tile_d, nprog = plan.tiles(nb, _current_stream(dev))
        st = stage(dev, seeds, coeffs, want_tables=not gaussian, want_coeffs=gaussian,
                   scalars_on_device=scalars_on_device)
        tables = st.tables
        if not gaussian and tables is None and G > 0:  # device coefficients: tables on the device
            tables = torch.empty(16 * G, dtype=torch.float32, device=dev)
            tk.tables_kernel[(triton_cdiv(G, 16),)](coeffs, tables, K, G, SUM_GROUP=SUM_GROUP,
                                                    GB=16, **kw)
            STATS["table_launches"] += 1
        any_buf = st.any_buffer
        gs = 1 if K <= 1 else (2 if K == 2 else SUM_GROUP)
        tk.apply_seeds_kernel[(nprog,)](
            desc_d, tile_d, plan.T, st.seeds, st.coeffs if st.coeffs is not None else any_buf,
            tables if tables is not None else any_buf, K, G, float(decay),
            LOG_T=plan.log_t, DTYPE=plan.dtype_code, ALIGNED=plan.aligned,
            APPLY_DECAY=float(decay) != 1.0, GAUSSIAN=gaussian, GS=gs, NB=nb,
            SUM_GROUP=SUM_GROUP, **kw)
        STATS["launches"] += 1


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: Noise blocks per CTA of the CUDA kernel (csrc/cuda/apply_seeds_cuda.cu, kTileBlocks).
CUDA_TILE_BLOCKS = 32


def run_cuda(ext, ts, seeds, coeffs, bases, decay: float, dist: str) -> None:
    """One launch of the CUDA extension's multi-tensor kernel over ``ts``. Seeds and coefficients
    go to the device in one staging copy (or stay there); the kernel builds the subset-sum tables
    in shared memory from the coefficients."""
    if not ts:
        return
    dev = ts[0].device
    check_scalars_device(seeds, coeffs, dev)
    _check_capture(seeds, coeffs, dev)
    K = int(seeds.numel())
    plan = plan_for(ts, bases)
    with device_guard(dev), _launch_lock:
        desc_d, tile_d, nprog = plan.tiles(CUDA_TILE_BLOCKS, _current_stream(dev))
        st = stage(dev, seeds, coeffs, want_tables=False, want_coeffs=True)
        ext.apply_seeds_mt(desc_d, tile_d, plan.T, nprog, st.seeds,
                           st.coeffs if st.coeffs is not None else st.any_buffer.view(torch.float32),
                           K, float(decay), 1 if dist == "gaussian" else 0, plan.dtype_code)
        STATS["launches"] += 1
