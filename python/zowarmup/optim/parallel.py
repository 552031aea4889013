"""Perturbation-parallel ZO: the ranks of a process group share the S directions of a step.

``ZOOptimizer(..., process_group=group, parallel="samples")``: every rank evaluates the **same
batch**; direction ``i`` (``0 <= i < S``) is evaluated by rank ``i % world`` only. One
``all_gather`` per step of ``2 + 2 * ceil(S / world)`` float64 scalars per rank (the seed
fingerprint, the count of directions it evaluated, and its ``L+``/``L-`` pairs) gives every rank
all 2S losses; every rank then computes the same projected gradients and applies the same update.
No weight travels.

Bit-identical weights across ranks, and equal to one process running the same S directions:

- **in place**: every rank makes *all* 2S+1 weight passes of the step (the passes are cheap next
  to the forwards) and calls the closure only at its own directions, so the weights go through the
  same sequence of roundings on every rank and in a single process, and each evaluated loss is
  the loss one process computes at that point;
- **exact** (``exact=True``): no rank writes the weights while evaluating; each evaluates its own
  directions at ``W +- eps*c*z`` made on the fly (:mod:`.exact_chunked`); the update is one pass.

**Combined with data parallelism** (``data_group=``): ranks are laid out on a grid. Ranks of one
``process_group`` (the "samples" group) hold the same shard and split the directions; ranks of one
``data_group`` evaluate the same directions on different shards of the batch (closure returns
``loss`` or ``(loss, n)`` as in the data-parallel mode). Per step the losses of a rank's directions
are first all-reduced over its ``data_group`` (the data-parallel all-reduce, ``2k + 4`` scalars),
then gathered over its ``process_group``. Every rank of the grid applies the same update.

Every rank evaluates all of its directions even past a non-finite loss (so all make the same weight
passes); the step is skipped when any of the 2S losses is not finite, and the gradients stop at the
first one, as in one process. An error raised on one rank only leaves the others waiting in the
collective until the group's timeout, as with the data-parallel mode.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as tdist

from .distributed import _seeds_fingerprint, reduce_device

__all__ = ["PARALLEL_MODES", "check_parallel", "owned", "gather_losses", "inplace_losses",
           "exact_losses"]

#: Values of ``ZOOptimizer(parallel=...)``.
PARALLEL_MODES = ("data", "samples")


def check_parallel(parallel, process_group, data_group) -> str:
    """``parallel`` if valid with the given groups; one-line ValueError otherwise."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"Invalid parallel = {parallel!r}: expected 'data' (each rank a shard of "
                         "the batch) or 'samples' (each rank a share of the S directions)")
    if parallel == "samples" and process_group is None:
        raise ValueError("ZOOptimizer: parallel='samples' needs a process_group (the ranks that "
                         "share the directions)")
    if data_group is not None and parallel != "samples":
        raise ValueError("ZOOptimizer: data_group is for parallel='samples' (the ranks that hold "
                         "other shards of the batch); with parallel='data' pass that group as "
                         "process_group")
    return parallel


def owned(num: int, rank: int, world: int) -> list[int]:
    """Indices of the directions rank ``rank`` evaluates: ``i % world == rank``."""
    return list(range(rank, num, world))


def gather_losses(own_values: Sequence[float], seeds: Sequence[int], group,
                  device: torch.device) -> list[float]:
    """All 2S losses, in direction order, from every rank's ``own_values`` (``L+``, ``L-`` of its
    directions :func:`owned`, in order): one ``all_gather`` of ``2 + 2*ceil(S/world)`` float64.

    Raises RuntimeError on every rank when the ranks' seed lists differ.
    """
    world = tdist.get_world_size(group)
    S = len(seeds)
    per = -(-S // world)
    buf = torch.zeros(2 + 2 * per, dtype=torch.float64, device=reduce_device(group, device))
    buf[0] = float(_seeds_fingerprint(seeds))
    buf[1] = float(len(own_values) // 2)
    if own_values:
        buf[2:2 + len(own_values)] = torch.tensor(list(own_values), dtype=torch.float64)
    parts = [torch.empty_like(buf) for _ in range(world)]
    tdist.all_gather(parts, buf, group=group)
    rows = [p.tolist() for p in parts]
    if any(r[0] != rows[0][0] for r in rows):
        raise RuntimeError("ZOOptimizer: the ranks of process_group evaluated different noise "
                           "seeds (their step counters, base seeds, num_samples or estimate() "
                           "seeds differ); every rank must take the same steps from the same "
                           "state")
    values = [math.nan] * (2 * S)
    for r, row in enumerate(rows):
        idx = owned(S, r, world)
        if int(row[1]) != len(idx):
            raise RuntimeError(f"ZOOptimizer: rank {r} of process_group evaluated {int(row[1])} "
                               f"directions, expected {len(idx)}")
        for j, i in enumerate(idx):
            values[2 * i], values[2 * i + 1] = row[2 + 2 * j], row[3 + 2 * j]
    return values


def _own_values(evals: list, own_seeds: list[int], reduce_data) -> list[float]:
    """The global losses of this rank's evaluations: ``reduce_data(evals, own_seeds)`` (the
    data-parallel all-reduce over the rank's data group) when given."""
    if reduce_data is None:
        return [v for v, _ in evals]
    if not evals:  # no direction here: nor on the rest of this data group (same share)
        return []
    return reduce_data(evals, own_seeds)


def inplace_losses(displace: Callable[[Sequence[int], Sequence[float]], None],
                   evaluate: Callable[[], tuple], seeds: Sequence[int], group, reduce_data,
                   device: torch.device) -> tuple[list[float], tuple | None]:
    """The in-place SPSA walk of a step with the closure called at this rank's directions only.

    ``displace(seeds, mults)`` adds ``sum_j mults[j] * eps_c * z(seeds[j])`` to the weights;
    ``evaluate()`` calls the closure and returns ``(loss, n)``; ``reduce_data(evals, seeds)``
    (None: no data group) all-reduces this rank's losses over its data group. The passes are those
    of the one-process in-place step. Returns (all 2S losses, the displacement left: ``(seed,
    sign)``). On an exception the displacement is undone before it propagates.
    """
    rank, world = tdist.get_rank(group), tdist.get_world_size(group)
    mine = set(owned(len(seeds), rank, world))
    evals: list = []
    disp = None
    try:
        for i, seed in enumerate(seeds):
            if disp is None:
                displace([seed], (1.0,))
            else:
                displace([disp[0], seed], (1.0, 1.0))
            disp = (seed, 1.0)
            if i in mine:
                evals.append(evaluate())
            displace([seed], (-2.0,))
            disp = (seed, -1.0)
            if i in mine:
                evals.append(evaluate())
        own = _own_values(evals, [seeds[i] for i in sorted(mine)], reduce_data)
        values = gather_losses(own, seeds, group, device)
    except BaseException:
        if disp is not None:
            displace([disp[0]], (-disp[1],))
        raise
    return values, disp


def exact_losses(perturbed: Callable[[int, float], object], evaluate: Callable[[], tuple],
                 seeds: Sequence[int], group, reduce_data, device: torch.device) -> list[float]:
    """All 2S losses with this rank evaluating its own directions in exact mode:
    ``perturbed(seed, sign)`` is a context in which forwards read ``w + sign*eps_c*z(seed)``."""
    rank, world = tdist.get_rank(group), tdist.get_world_size(group)
    mine = owned(len(seeds), rank, world)
    evals: list = []
    for i in mine:
        for sign in (1.0, -1.0):
            with perturbed(seeds[i], sign):
                evals.append(evaluate())
    own = _own_values(evals, [seeds[i] for i in mine], reduce_data)
    return gather_losses(own, seeds, group, device)
