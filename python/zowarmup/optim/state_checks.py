"""Checks of what :class:`~.optimizer.ZOOptimizer` is given: a saved state, its parameters.

Kept apart from the optimizer so the class stays thin: each function raises one-line errors naming
the entry and the value, and changes nothing.

- :func:`check_zo_state_dict`: the ``"zo"`` entry of a state dict (``load_state_dict``), strict:
  integers must be integers (not floats, strings or bools; a NaN, an inf or 3.7 is refused rather
  than converted), counters non-negative and consistent (``consecutive_skips <= skipped_steps <=
  step``), the seed an unsigned 64-bit integer.
- :func:`check_param_storage`: a parameter must hold real memory (not the ``meta`` device), since
  a ZO step reads and writes its values.
"""
from __future__ import annotations

import numbers

import torch

_U64 = 2 ** 64
_INT_KEYS = ("step", "skipped_steps", "consecutive_skips")


def _strict_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_zo_state_dict(state_dict) -> None:
    """Raise ValueError (one line, naming the key and the value) unless ``state_dict`` is a dict
    whose ``"zo"`` entry is a valid ZOOptimizer integer state."""
    where = "ZOOptimizer.load_state_dict"
    if not isinstance(state_dict, dict):
        raise ValueError(f"{where}: expected a state dict, got {type(state_dict).__name__}")
    if "zo" not in state_dict:
        raise ValueError(f"{where}: the state dict has no 'zo' entry; it was not written by "
                         "ZOOptimizer.state_dict()")
    zo = state_dict["zo"]
    if not isinstance(zo, dict):
        raise ValueError(f"{where}: 'zo' must be a dict, got {type(zo).__name__} {zo!r:.80}")
    for key in ("step", "seed"):
        if key not in zo:
            raise ValueError(f"{where}: 'zo' lacks '{key}'")
    vals = {}
    for key in _INT_KEYS:
        if key not in zo:
            continue
        v = zo[key]
        if not _strict_int(v):
            raise ValueError(f"{where}: zo['{key}'] must be an integer >= 0, got "
                             f"{type(v).__name__} {v!r:.80}")
        if v < 0:
            raise ValueError(f"{where}: zo['{key}'] = {v} is negative")
        vals[key] = int(v)
    seed = zo["seed"]
    if not _strict_int(seed) or not 0 <= int(seed) < _U64:
        raise ValueError(f"{where}: zo['seed'] must be an integer in [0, 2**64), got "
                         f"{type(seed).__name__} {seed!r:.80}")
    step, skipped = vals["step"], vals.get("skipped_steps", 0)
    consecutive = vals.get("consecutive_skips", 0)
    if skipped > step:
        raise ValueError(f"{where}: zo['skipped_steps'] = {skipped} exceeds zo['step'] = {step}")
    if consecutive > skipped:
        raise ValueError(f"{where}: zo['consecutive_skips'] = {consecutive} exceeds "
                         f"zo['skipped_steps'] = {skipped}")
    for key in ("num_samples", "max_skips"):
        v = zo.get(key)
        if v is not None and (not _strict_int(v) or v < 1):
            raise ValueError(f"{where}: zo['{key}'] must be an integer >= 1, got "
                             f"{type(v).__name__} {v!r:.80}")
    if "dist" in zo and not isinstance(zo["dist"], str):
        raise ValueError(f"{where}: zo['dist'] must be a string, got {type(zo['dist']).__name__}")


def check_param_storage(devices: dict) -> None:
    """Raise ValueError when the parameters' device (``devices``: device name -> description of a
    parameter on it, as ``ZOOptimizer._check_params`` collects them) is the meta device."""
    if "meta" in devices:
        raise ValueError(f"ZOOptimizer: {devices['meta']} is on the meta device (a shape without "
                         "values); materialize the model first, e.g. model.to_empty(device=...) "
                         "and initialize or load its weights")
