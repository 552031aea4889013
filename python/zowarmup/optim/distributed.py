"""Data-parallel ZO over torch.distributed: the ranks add up their losses and nothing else.

Every rank holds the whole model and evaluates its own shard of the batch; per step the 2S local
losses go through one ``all_reduce`` (sum) of ``2S + 4`` float64 scalars
(:func:`all_reduce_losses`), after which every rank computes the same projected gradients and
applies the same seeds, so the weights stay bit-identical across ranks without sending any weight
(docs/DESIGN.md, "The ZO step").
See :class:`~zowarmup.optim.ZOOptimizer`'s "Data parallel" section for the user-facing contract.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch
import torch.distributed as tdist

__all__ = ["check_process_group", "check_still_initialized", "reduce_device", "all_reduce_losses"]


def check_process_group(group):
    """``group`` if it is a usable torch.distributed process group this process belongs to.

    None passes through (one process). Raises RuntimeError when torch.distributed is unavailable
    or not initialized, TypeError for a non-``ProcessGroup``, ValueError when this process is not a
    member.
    """
    if group is None:
        return None
    if not tdist.is_available():
        raise RuntimeError("ZOOptimizer: process_group was given, but this torch build has no "
                           "torch.distributed")
    if not tdist.is_initialized():
        raise RuntimeError("ZOOptimizer: process_group was given, but torch.distributed is not "
                           "initialized; call torch.distributed.init_process_group(...) first, "
                           "then pass torch.distributed.group.WORLD or a group from "
                           "torch.distributed.new_group(...)")
    if not isinstance(group, tdist.ProcessGroup):
        raise TypeError(f"ZOOptimizer: process_group must be a torch.distributed.ProcessGroup "
                        f"(e.g. torch.distributed.group.WORLD) or None, got "
                        f"{type(group).__name__}")
    if tdist.get_rank(group) < 0:
        raise ValueError(f"ZOOptimizer: this process (global rank {tdist.get_rank()}) is not a "
                         "member of process_group")
    return group


def check_still_initialized(group) -> None:
    """RuntimeError when an optimizer holds ``group`` but torch.distributed was torn down since."""
    if group is not None and not tdist.is_initialized():
        raise RuntimeError("ZOOptimizer: torch.distributed is no longer initialized "
                           "(destroy_process_group was called), but this optimizer has a "
                           "process_group")


def _seeds_fingerprint(seeds: Sequence[int]) -> int:
    """16-bit hash of a seed list, to check that every rank evaluates the same directions."""
    return zlib.crc32(b"".join(int(s).to_bytes(8, "little") for s in seeds)) & 0xFFFF


def reduce_device(group, param_device: torch.device) -> torch.device:
    """Where the loss buffer of the all-reduce lives: the CPU when the group's backend takes CPU
    tensors (gloo, mpi), else ``param_device`` (nccl takes CUDA tensors only)."""
    backend = str(tdist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return param_device


def all_reduce_losses(evals: Sequence[tuple[float, float | None]], seeds: Sequence[int], group,
                      device: torch.device) -> list[float]:
    """The global losses of one step's evaluations: one all-reduce of ``len(evals) + 4`` float64
    scalars over ``group``.

    Args:
        evals: this rank's ``(loss, n)`` per closure call, in call order; ``n`` is None for a
            closure that returns a plain loss (counted as 1), else its sample count (>= 0).
        seeds: the step's seeds (their fingerprint is compared across ranks).
        group: the process group.
        device: where the buffer lives (:func:`reduce_device`).

    Returns:
        ``len(evals)`` Python floats ``sum_r n_r * L_r,i / sum_r n_r``, the same on every rank.

    Each rank contributes ``n * loss`` per evaluation plus ``n``, a "returned (loss, n)" flag and a
    fingerprint of the seeds with its square. A rank with ``n = 0`` contributes exactly 0 (the mean
    over an empty shard is NaN). Every check on the reduced values raises on every rank alike, so
    no rank is left waiting.
    """
    counts = [n for _, n in evals]
    if any(n != counts[0] for n in counts):
        raise ValueError(f"ZOOptimizer: the closure returned different sample counts within "
                         f"one step ({', '.join(map(str, counts))}); it must evaluate the "
                         "same shard on every call")
    n = counts[0]
    w = 1.0 if n is None else n
    fp = _seeds_fingerprint(seeds)
    buf = [w * loss if w != 0.0 else 0.0 for loss, _ in evals]
    buf += [w, float(n is not None), float(fp), float(fp * fp)]
    t = torch.tensor(buf, dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=group)
    vals = t.tolist()
    k = len(evals)
    total, counted, fp_sum, fp_sq = vals[k:]
    world = tdist.get_world_size(group)
    # all fingerprints equal <=> world * sum(f^2) == sum(f)^2 (Cauchy-Schwarz); the sums are
    # integers below 2**53, so exact in float64
    if world * (1 << 32) < (1 << 53) and world * int(fp_sq) != int(fp_sum) ** 2:
        raise RuntimeError("ZOOptimizer: the ranks of process_group evaluated different "
                           "noise seeds (their step counters, base seeds or estimate() seeds "
                           "differ); every rank must take the same steps from the same "
                           "state")
    if counted not in (0.0, float(world)):
        raise ValueError(f"ZOOptimizer: {int(counted)} of {world} ranks' closures returned "
                         "(loss, n) and the others a plain loss; all ranks must return the "
                         "same form")
    if not total > 0.0:
        raise ValueError("ZOOptimizer: every rank's closure returned n = 0 samples; there is "
                         "no loss to evaluate")
    return [v / total for v in vals[:k]]
