"""Argument checks and the numpy random streams shared by the loaders and the partitioning."""
from __future__ import annotations

import numbers

import numpy as np

from zo_kernels import check_seed

from ..seeds import (TAG_DATA_PARTITION, TAG_DATA_RESOURCES, TAG_DATA_SAMPLE,  # noqa: F401
                     TAG_DATA_SPLIT, TAG_DATA_SUBSET)


def _check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _check_seed(seed) -> int:
    return check_seed(seed, "seed")


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *tags]))
