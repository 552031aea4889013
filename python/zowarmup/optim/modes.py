"""The SPSA evaluation in exact mode and/or with perturbation-parallel ranks, on plain data.

Beside :func:`.functional.spsa_estimate` (in place, one process or data-parallel): the same
:class:`.functional.SPSAResult` from

- exact mode (:mod:`.exact_chunked`): forwards read ``w +- eps_k c_k z`` made on the fly; nothing is
  displaced, so the update that follows has no restore;
- perturbation-parallel ranks (:mod:`.parallel`), in place or exact, optionally on a grid with a
  data group.

Projected gradients come from :func:`.functional.spsa_grads`, as everywhere.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import distributed, parallel
from .exact_chunked import ChunkedPerturbation, exact_values
from .functional import FlatParams, GroupHypers, SPSAResult, _displace, _evaluate, spsa_grads

__all__ = ["estimate_modes"]


def estimate_modes(params: FlatParams, tracked: Sequence[torch.Tensor],
                   hypers: Sequence[GroupHypers], closure: Callable, seeds: Sequence[int],
                   eps: float, *, exact: bool, chunk_bytes: int, process_group=None,
                   samples: bool = False, data_group=None,
                   keep_last: bool = False) -> tuple[SPSAResult, bool]:
    """Evaluate ``L+`` / ``L-`` for every seed in exact mode and/or sample-parallel.

    Args:
        params: the groups' tensors (:func:`.functional.flat_params`).
        tracked: the same parameters as the objects the model reads (``param_groups`` order), for
            exact mode.
        hypers: per group, its hyper-parameters (``eps * scale``).
        closure, seeds, eps: as for :func:`.functional.spsa_estimate`.
        exact: evaluate at weights made on the fly (the stored ones are never written).
        chunk_bytes: exact mode's chunk bound.
        process_group: data-parallel group (``samples`` False) or the group sharing the
            directions (``samples`` True).
        data_group: with ``samples``: the ranks holding the other shards for the same directions.
        keep_last: in place, leave the weights at ``-eps_c * z(seeds[-1])`` when every loss is
            finite (for the fused final pass).

    Returns:
        (:class:`.functional.SPSAResult`, displaced): ``displaced`` says the weights were left at
        ``w - eps_c z(seeds[-1])`` (then the final pass restores them).
    """
    eps_c = [h.eps_c for h in hypers]
    device = params.device

    def evaluate():
        return _evaluate(closure)
    reduce_data = None
    if samples and data_group is not None:
        def reduce_data(evals, own_seeds):
            return distributed.all_reduce_losses(evals, own_seeds, data_group,
                                                 distributed.reduce_device(data_group, device))
    if exact:
        offs = [o for group in params.offsets for o in group]
        alphas = [ec for ec, ts in zip(eps_c, params.tensors) for _ in ts]
        cp = ChunkedPerturbation(list(tracked), offs, params.dist, params.backend, chunk_bytes)

        def perturbed(seed, sign):
            return cp.perturb(seed, [sign * a for a in alphas])
        if samples:
            values = parallel.exact_losses(perturbed, evaluate, seeds, process_group, reduce_data,
                                           device)
        else:
            reduce = None
            if process_group is not None:
                def reduce(evals, ss):
                    return distributed.all_reduce_losses(
                        evals, ss, process_group, distributed.reduce_device(process_group, device))
            values = exact_values(perturbed, evaluate, seeds, reduce)
        return SPSAResult(*spsa_grads(values, eps)), False

    def displace(ss, mults):
        _displace(params, eps_c, list(ss), tuple(mults))
    values, disp = parallel.inplace_losses(displace, evaluate, seeds, process_group, reduce_data,
                                           device)
    losses, grads, ok = spsa_grads(values, eps)
    if disp is not None and (not ok or not keep_last):
        displace([disp[0]], (-disp[1],))
        return SPSAResult(losses, grads, ok), False
    return SPSAResult(losses, grads, ok), disp is not None
