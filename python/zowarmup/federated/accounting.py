"""Accounting: communication per client and round, and on-device memory per method.

Communication is counted by the embedded runner from the serialized messages themselves (see
:mod:`.messages` for the layouts); this module aggregates those counts into per-phase summaries.

Memory has two parts:

- by formula, for any model: ``zowarmup.models.model_memory_table`` (the paper's Table 1);
- measured, for the model in use: :func:`measure_peak` runs a client's actual work (an inference
  pass, a ZO step on the whole local dataset in micro-batches, a backprop SGD step) and records
  the peak of live tensor bytes. On CUDA it reads ``torch.cuda.max_memory_allocated``; on the CPU,
  where torch keeps no allocator statistics, a ``TorchDispatchMode`` tracks every tensor storage
  an operator creates until it is freed (weights that exist before the call are counted once, as
  the baseline). Allocator caching and fragmentation are not included in either.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:  # weak references to storages (so freed storages leave the live set)
    from torch.multiprocessing.reductions import StorageWeakRef
except Exception:  # pragma: no cover
    StorageWeakRef = None


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by operators while active; records the peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple] = {}
        self.current = 0
        self.peak = 0
        self._ops = 0

    def _sweep(self):
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._ops += 1
        self._sweep()
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                try:
                    st = t.untyped_storage()
                except Exception:
                    continue
                key = st.data_ptr()
                if key in self.live and not self.live[key][0].expired():
                    continue
                nbytes = st.nbytes()
                self.live[key] = (StorageWeakRef(st), nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def measure_peak(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors allocated (and still alive at the same time) while ``fn()`` runs.

    Tensors that exist before the call (weights, data) are not included: add them separately.
    CUDA: ``max_memory_allocated`` minus the allocation at entry. CPU: the dispatch-mode tracker
    described in the module docstring (requires ``StorageWeakRef``; returns -1 if unavailable).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if StorageWeakRef is None:
        return -1
    mode = _LiveBytes()
    with mode:
        fn()
    return int(mode.peak)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return (sum(p.numel() * p.element_size() for p in model.parameters())
            + sum(b.numel() * b.element_size() for b in model.buffers()))


def phase_summary(records: list[dict]) -> dict:
    """Per-phase communication summary from metrics records.

    For each phase: rounds, the median per-round bytes up/down of a participating client (steady
    state), their maxima (the pivot round's one-off weights download shows in the max), and the
    phase's total bytes over all clients.
    """
    out: dict = {}
    for phase in dict.fromkeys(r["phase"] for r in records):
        rs = [r for r in records if r["phase"] == phase]
        out[phase] = {
            "rounds": len(rs),
            "bytes_up_per_client_median": statistics.median(r["bytes_up_per_client"] for r in rs),
            "bytes_down_per_client_median": statistics.median(r["bytes_down_per_client"] for r in rs),
            "bytes_up_per_client_max": max(r["bytes_up_per_client"] for r in rs),
            "bytes_down_per_client_max": max(r["bytes_down_per_client"] for r in rs),
            "bytes_up_total": int(sum(r["bytes_up_total"] for r in rs)),
            "bytes_down_total": int(sum(r["bytes_down_total"] for r in rs)),
        }
    return out


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
