"""ZOWarmUp federated training: warm-up on high-resource clients, then seed-only ZO rounds.

Modules:

- :mod:`.config` - :class:`RunConfig` and its sections, TOML/JSON loading, validation.
- :mod:`.methods` - the registry of methods (ZOWarmUp and every baseline): one module per method
  family, one line per method.
- :mod:`.messages` - the protocol's messages and their compact binary serialization.
- :mod:`.client` / :mod:`.server` - the protocol logic, message in -> message out (no loop).
- :mod:`.federation` - the setup every run shares: device, data split, global model, server,
  clients, per-round sampling.
- :mod:`.driver` - the one round driver (sampling, seeds, aggregation, evaluation, records,
  summaries, bytes) over an exchange: in-process clients or a transport to deployed clients.
- :mod:`.loop` - :class:`Runner`, the embedded single-process runner (run folder, checkpoints).
- :mod:`.experiment` - a method beside its baselines over seeds, and the comparison table.
- :mod:`.validation` - checks of untrusted messages before they touch state.
- :mod:`.replica` / :mod:`.deploy` - deployments: a client keeping its own model (catch-up,
  checksums) and the :class:`~.deploy.Coordinator` running the driver over a transport with
  deadlines and repairs (in-memory here; Flower in :mod:`zowarmup.flower`).
- :mod:`.accounting`, :mod:`.checkpoint`, :mod:`.plotting`, :mod:`.state` - helpers.

The exact ZO evaluation mode is :mod:`zowarmup.optim.exact`; the ZO arithmetic is
:mod:`zowarmup.optim.functional`.

Quick start::

    from zowarmup.federated import load_config, run_experiment
    run_experiment(load_config(overrides=["rounds=60"]), out="runs")
"""
from .config import (METHOD_LABELS, METHODS, ConfigError, RunConfig, apply_overrides, load_config,
                     load_file, validate)

__all__ = ["RunConfig", "ConfigError", "METHODS", "METHOD_LABELS", "load_config", "load_file",
           "apply_overrides", "validate", "Runner", "run_experiment", "resume_experiment",
           "resume_run", "compare", "format_table"]


def __getattr__(name):
    # The loop pulls in torch, data and models: import it on first use.
    if name in ("Runner", "resume_run"):
        from . import loop
        return getattr(loop, name)
    if name in ("run_experiment", "resume_experiment", "compare", "format_table"):
        from . import experiment
        return getattr(experiment, name)
    raise AttributeError(f"module 'zowarmup.federated' has no attribute {name!r}")
