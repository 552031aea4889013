"""zo_kernels: seed-regenerated noise for zeroth-order training, fused into one in-place op.

Public API (see each function's docstring):

- :func:`apply_seeds_` - ``p = p * decay + sum_k c_k z_k`` in place over a list of tensors, K seeds
  in one pass, noise regenerated from a counter-based Philox RNG (no noise tensor is ever stored).
- :func:`perturb_` - ``apply_seeds_`` with one seed.
- :func:`noise` - the stream materialized, for tests and debugging.
- :func:`offsets` - where each tensor starts in the flat vector (128-element aligned).
- :func:`backends` - which backends (``reference``, ``cpu``, ``triton``, ``cuda``) are usable.
- :func:`check_seed` - the unsigned 64-bit seed check; :func:`normalize_backend` - ``"auto"``/None
  to None, any other name checked.

The noise stream is a contract (stream version :data:`STREAM_VERSION`): the same seed gives the same
bits on every backend, device and thread count. So is the fp32 accumulation order of ``apply_seeds_``
(Rademacher: subset-sum tables over groups of :data:`SUM_GROUP` seeds, added group by group; see its
docstring), which makes its results bit-identical everywhere too.
"""
from ._api import (BACKENDS, DISTS, SUM_GROUP, SUPPORTED_DTYPES, apply_seeds_, backends, check_seed,
                   noise, normalize_backend, offsets, perturb_)

#: Version of the noise-stream contract implemented here (docs/DESIGN.md, "Noise stream").
STREAM_VERSION = 1
__version__ = "0.1.0"

__all__ = ["apply_seeds_", "perturb_", "noise", "offsets", "backends", "check_seed",
           "normalize_backend", "BACKENDS", "DISTS",
           "SUPPORTED_DTYPES", "STREAM_VERSION", "SUM_GROUP", "__version__"]
