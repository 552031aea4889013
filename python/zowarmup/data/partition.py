"""Federated data splits: label-skewed client shards, resource assignment and client sampling.

- :func:`dirichlet_partition` - the paper's label-skewed split into equal-size client shards.
- :func:`assign_resources` - which clients are high-resource (can run backprop).
- :func:`sample_clients` - the clients taking part in a round.
- :func:`label_entropy` - how skewed a split is.

Every random choice here uses its own numpy ``SeedSequence([seed, tag, ...])`` (tags in
:mod:`zowarmup.seeds`), so the functions are deterministic for a seed, independent of each other and
of torch's global RNG.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

from ._util import TAG_DATA_PARTITION as _TAG_PARTITION
from ._util import TAG_DATA_RESOURCES as _TAG_RESOURCES
from ._util import TAG_DATA_SAMPLE as _TAG_SAMPLE
from ._util import _check_int, _check_seed, _rng

__all__ = ["dirichlet_partition", "assign_resources", "sample_clients", "label_entropy"]

#: Most classes a split accepts (a larger label is a corrupted or foreign file, not a class).
MAX_CLASSES = 100_000
#: Most clients x classes cells of the split's probability tables (8 bytes each: 400 MB).
MAX_TABLE = 50_000_000

# --------------------------------------------------------------------------------------------------
# Federated splits
# --------------------------------------------------------------------------------------------------

def dirichlet_partition(labels, num_clients: int, alpha: float, seed: int,
                        num_classes: int | None = None) -> list[np.ndarray]:
    """Split sample indices into ``num_clients`` equal-size, label-skewed shards.

    The scheme (equal-size Dirichlet shards, as in FedDyn / the ZOWarmUp paper's setup):

    1. Each client i draws label proportions ``q_i ~ Dirichlet(alpha * 1_K)`` (``alpha=inf``:
       ``q_i`` = the global class frequencies, an IID split). Classes absent from ``labels`` get 0.
    2. Shard sizes are ``n // N`` for every client plus one for ``n % N`` clients chosen at random:
       sizes differ by at most 1 and all ``n`` samples are used, each exactly once.
    3. The ``n`` slots (client i appearing ``size_i`` times) are visited in a random order; at each
       slot its client draws a class from ``q_i`` restricted to the classes that still have
       unassigned samples (renormalized), and takes the next sample of that class (each class's
       samples are pre-shuffled). If ``q_i`` puts no mass on any remaining class, the class is
       drawn in proportion to the remaining counts instead.

    Small ``alpha`` concentrates each ``q_i`` on few classes (strong label skew); large ``alpha``
    approaches the global distribution. Because shards must be equal and classes run out, late
    slots are partly forced, so the realized skew is somewhat weaker than ``q_i`` alone implies.

    Args:
        labels: (n,) non-negative integer labels (numpy array, list, or tensor).
        num_clients: N >= 1, at most n.
        alpha: Dirichlet concentration > 0 (``float('inf')`` allowed).
        seed: non-negative int; the result is a pure function of (labels, N, alpha, seed).
        num_classes: K (default ``max(labels) + 1``).

    Returns:
        list of N sorted int64 index arrays into ``labels``.

    Cost: O(n) Python steps (measured 0.7 s for CIFAR-10's 50k labels and 50 clients on this
    2-core machine, so about half a minute for ImageNet32's 1.28M) plus O(N K^2) for exhausted
    classes.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        i = int(np.argmin(y))
        raise ValueError(f"labels must be non-negative, got labels[{i}] = {int(y[i])}")
    n = len(y)
    num_clients = _check_int("num_clients", num_clients, 1, n)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not float(alpha) > 0:
        raise ValueError(f"alpha must be a positive float (inf allowed), got {alpha!r}")
    alpha = float(alpha)
    seed = _check_seed(seed)
    i_max = int(np.argmax(y))
    top = int(y[i_max])
    if num_classes is not None:
        num_classes = _check_int("num_classes", num_classes, 1, MAX_CLASSES)
        if top >= num_classes:
            raise ValueError(f"labels[{i_max}] = {top} is outside the {num_classes} classes "
                             f"(0..{num_classes - 1})")
        k = num_classes
    else:
        if top >= MAX_CLASSES:
            raise ValueError(f"labels[{i_max}] = {top} is not a plausible class label (at most "
                             f"{MAX_CLASSES} classes; pass num_classes for the real count)")
        k = top + 1
    # The split's tables are N x K floats: refuse what would not fit comfortably in memory.
    if num_clients * k > MAX_TABLE:
        raise ValueError(f"{num_clients} clients x {k} classes is too large a split "
                         f"(at most {MAX_TABLE} cells)")

    rng = _rng(seed, _TAG_PARTITION)
    counts = np.bincount(y, minlength=k).astype(np.int64)
    if math.isinf(alpha):
        props = np.tile(counts / n, (num_clients, 1))
    else:
        props = rng.dirichlet(np.full(k, alpha), size=num_clients)
    props[:, counts == 0] = 0.0
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[rng.choice(num_clients, n % num_clients, replace=False)] += 1
    order = rng.permutation(np.repeat(np.arange(num_clients), sizes))
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(k)]
    u = rng.random(n)

    remaining = counts.copy()
    taken = np.zeros(k, dtype=np.int64)
    cum = np.cumsum(props, axis=1)
    out: list[list[int]] = [[] for _ in range(num_clients)]
    for t in range(n):
        i = order[t]
        row = cum[i]
        if row[-1] > 0:
            c = int(np.searchsorted(row, u[t] * row[-1], side="right"))
            if c >= k or props[i, c] <= 0:  # u*total rounded up to total: last class with mass
                c = int(np.flatnonzero(props[i] > 0)[-1])
        else:
            rc = np.cumsum(remaining)
            c = int(np.searchsorted(rc, u[t] * rc[-1], side="right"))
            if c >= k or remaining[c] <= 0:
                c = int(np.flatnonzero(remaining > 0)[-1])
        out[i].append(pools[c][taken[c]])
        taken[c] += 1
        remaining[c] -= 1
        if remaining[c] == 0:
            props[:, c] = 0.0
            cum = np.cumsum(props, axis=1)
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in out]


def label_entropy(labels, shards: Sequence[np.ndarray], num_classes: int | None = None) -> float:
    """Mean over shards of the Shannon entropy (nats) of each shard's label histogram.

    ``log(K)`` for perfectly balanced shards, 0 when every shard holds a single class: a measure of
    label skew (lower = more skewed).
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    k = num_classes or int(y.max()) + 1
    ents = []
    for s in shards:
        if len(s) == 0:
            continue
        p = np.bincount(y[s], minlength=k) / len(s)
        p = p[p > 0]
        ents.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(ents)) if ents else 0.0


def assign_resources(num_clients: int, hi_fraction: float, seed: int) -> np.ndarray:
    """Mark clients as high-resource (can run backprop) or low-resource (forward only).

    Exactly ``round(hi_fraction * num_clients)`` clients (Python's ``round``: half to even) are
    high-resource, chosen uniformly at random without replacement.

    Args:
        num_clients: N >= 1.
        hi_fraction: in [0, 1] (the paper's hi/lo ratios 10/90 .. 90/10 are 0.1 .. 0.9).
        seed: non-negative int.

    Returns:
        bool array (N,), True = high-resource.
    """
    num_clients = _check_int("num_clients", num_clients, 1)
    if (isinstance(hi_fraction, bool) or not isinstance(hi_fraction, numbers.Real)
            or not 0.0 <= float(hi_fraction) <= 1.0):
        raise ValueError(f"hi_fraction must be a float in [0, 1], got {hi_fraction!r}")
    seed = _check_seed(seed)
    n_hi = int(round(float(hi_fraction) * num_clients))
    mask = np.zeros(num_clients, dtype=bool)
    mask[_rng(seed, _TAG_RESOURCES).choice(num_clients, n_hi, replace=False)] = True
    return mask


def sample_clients(num_clients: int, per_round: int, round_idx: int, seed: int,
                   candidates=None) -> np.ndarray:
    """Clients taking part in one round, uniformly without replacement.

    Deterministic per ``(seed, round_idx)`` and independent across rounds (the generator is
    ``SeedSequence([seed, tag, round_idx])``), so a resumed run samples exactly the same clients.

    Args:
        num_clients: N >= 1.
        per_round: clients per round, 1 <= per_round <= N.
        round_idx: round number >= 0.
        seed: non-negative int.
        candidates: optional ids to draw from (e.g. the high-resource clients during warm-up);
            each must be in ``[0, N)`` and unique. When ``per_round >= len(candidates)`` all of
            them are returned.

    Returns:
        sorted int64 array of client ids.
    """
    num_clients = _check_int("num_clients", num_clients, 1)
    per_round = _check_int("per_round", per_round, 1, num_clients)
    round_idx = _check_int("round_idx", round_idx, 0)
    seed = _check_seed(seed)
    if candidates is None:
        pool = np.arange(num_clients, dtype=np.int64)
    else:
        pool = np.asarray(candidates)
        if pool.dtype == bool:
            raise TypeError("candidates must be client ids, not a mask; use np.flatnonzero(mask)")
        if pool.ndim != 1 or (len(pool) and not np.issubdtype(pool.dtype, np.integer)):
            raise ValueError(f"candidates must be a 1-D array of client ids, got {pool!r}")
        pool = pool.astype(np.int64)
        if len(pool) and (pool.min() < 0 or pool.max() >= num_clients):
            raise ValueError(f"candidates must lie in [0, {num_clients}), got {pool.tolist()}")
        if len(np.unique(pool)) != len(pool):
            raise ValueError("candidates must be unique")
        pool = np.sort(pool)
    if per_round >= len(pool):
        return pool.copy()
    rng = _rng(seed, _TAG_SAMPLE, round_idx)
    return np.sort(rng.choice(pool, per_round, replace=False)).astype(np.int64)

