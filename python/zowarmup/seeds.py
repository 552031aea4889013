"""Deterministic seed derivation: many independent 64-bit noise seeds from a few integers.

Every seed that drives a noise direction in zowarmup comes from :func:`derive_seed`:

- the optimizer's sample ``s`` of step ``t``: ``derive_seed(seed, t, s)``
  (:meth:`zowarmup.ZOOptimizer.sample_seeds`);
- the federated loop's sample ``s`` of client ``c`` in round ``r``: ``derive_seed(run_seed, r, c, s)``.

The function is pure Python integer arithmetic (no torch, no global RNG), so it gives the same value
on every machine, Python version and process: a server and its clients agree on seeds without
sending more than the words.

Scheme (version :data:`SEED_SCHEME_VERSION`), a SplitMix64 chain over the words, all arithmetic
modulo 2**64::

    h = SALT                                  # 0x7A6F7761726D7570, the ASCII bytes of "zowarmup"
    for w in words:
        h = mix64((h ^ w) + GAMMA)            # GAMMA = 0x9E3779B97F4A7C15 (SplitMix64's increment)
    return h

    mix64(z):                                 # SplitMix64's output function (a bijection on 64 bits)
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

Every step of the chain is a bijection of ``h`` for a fixed word and of the word for a fixed ``h``,
so for a fixed prefix, different last words always give different seeds (the S seeds of one step
never collide), and the output is a well-mixed 64-bit value. The scheme is part of the
reproducibility contract: changing it changes every training run, so it is versioned.
"""
from __future__ import annotations

import numbers

__all__ = ["derive_seed", "sample_seeds", "SEED_SCHEME_VERSION", "SALT", "GAMMA"]

# ------------------------------------------------------------------------------------------------
# Stream tags: the one list of every random stream's tag. A tag is the word after the run seed in
# ``derive_seed(run_seed, TAG, ...)`` (torch generators and noise seeds) or in numpy's
# ``SeedSequence([seed, TAG, ...])`` (data splits), so that two streams of one run never share
# random numbers. The values are part of the results: changing one changes every run.
# ------------------------------------------------------------------------------------------------
#: numpy streams of :mod:`zowarmup.data`: train/test split, Dirichlet partition, hi/lo assignment,
#: per-round client sampling, optional subset of a data set.
TAG_DATA_SPLIT = 0x5E1
TAG_DATA_PARTITION = 0xD1C
TAG_DATA_RESOURCES = 0x4E5
TAG_DATA_SAMPLE = 0x5A3
TAG_DATA_SUBSET = 0x5B5
#: torch's global RNG: the global model's initialisation, and the per-round reseed.
TAG_INIT = 0x1417
TAG_ROUND = 0x20D
#: a client's SGD batch order in a warm-up round.
TAG_SGD = 0x5C1
#: FedKSeed: which pool seed a local step uses, and its mini-batch.
TAG_KSEED_INDEX = 0x4B1
TAG_KSEED_BATCH = 0x4B2
#: the server's ZO seeds of a round, and FedKSeed's seed pool.
TAG_ZO_SEEDS = 0x2E0
TAG_POOL = 0x9001
#: a client's per-round shuffle when ``zo.epoch_split`` splits one pass over the steps.
TAG_ZO_SPLIT = 0x2E1
#: the validation split ``zowarmup sweep`` carves from the training data.
TAG_VAL_SPLIT = 0x5E2

#: Version of the derivation scheme documented above (recorded in optimizer checkpoints).
SEED_SCHEME_VERSION = 1
#: Initial chain value: the ASCII bytes of "zowarmup" read as a big-endian 64-bit integer.
SALT = 0x7A6F7761726D7570
#: SplitMix64's Weyl increment (2**64 / golden ratio, odd).
GAMMA = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's output function on a 64-bit unsigned int (a bijection)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _check_word(w, i: int) -> int:
    if isinstance(w, bool) or not isinstance(w, numbers.Integral):
        raise TypeError(f"derive_seed: words[{i}] must be an int in [0, 2**64), "
                        f"got {type(w).__name__} {w!r}")
    w = int(w)
    if not 0 <= w <= _M64:
        raise ValueError(f"derive_seed: words[{i}] = {w} is out of range; every word must be an "
                         "unsigned 64-bit int in [0, 2**64)")
    return w


def derive_seed(*words: int) -> int:
    """Mix one or more unsigned 64-bit integers into one noise seed (deterministic, documented).

    Args:
        *words: at least one int in ``[0, 2**64)`` (for example ``(seed, step, sample)`` or
            ``(run_seed, round, client, sample)``). numpy and torch integer scalars are accepted.

    Returns:
        An int in ``[0, 2**64)``: the SplitMix64 chain of the module docstring. Injective in the
        last word for a fixed prefix.

    Raises:
        ValueError: no words, or a word outside ``[0, 2**64)``.
        TypeError: a word that is not an integer (floats and bools are rejected, not rounded).
    """
    if not words:
        raise ValueError("derive_seed: give at least one word")
    checked = [_check_word(w, i) for i, w in enumerate(words)]
    h = SALT
    for w in checked:
        h = _mix64(((h ^ w) + GAMMA) & _M64)
    return h


def sample_seeds(seed: int, step: int, num_samples: int) -> list[int]:
    """The seeds of one optimizer step: ``[derive_seed(seed, step, s) for s in range(num_samples)]``.

    Args:
        seed: the optimizer's base seed, in ``[0, 2**64)``.
        step: the step index (0 for the first step), ``>= 0``.
        num_samples: S, the number of noise directions, ``>= 1``.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) \
            or num_samples < 1:
        raise ValueError(f"sample_seeds: num_samples must be an int >= 1, got {num_samples!r}")
    return [derive_seed(seed, step, s) for s in range(int(num_samples))]
