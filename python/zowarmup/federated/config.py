"""Experiment configuration: typed sections, validation, TOML/JSON files and ``key=value`` overrides.

A configuration is a :class:`RunConfig` made of sections (:class:`DataConfig`, :class:`ModelConfig`,
:class:`WarmupConfig`, :class:`ZOConfig`, :class:`KSeedConfig`). Every field has a default; the
defaults are the offline CPU-scale run that ``zowarmup run`` performs with no arguments (digits,
50 clients, Dirichlet alpha 0.1, 10/90 high/low-resource, warm-up then ZO; ``configs/digits.toml``
spells the same values out).

Files are TOML (``tomllib``, stdlib) or JSON, shaped like the dataclasses::

    method = "zowarmup"
    rounds = 120
    [zo]
    num_seeds = 20

Overrides use dotted keys, ``zo.num_seeds=10`` or ``rounds=60``; a value is read as a TOML value when
it parses as one (``0.5``, ``true``, ``[0, 1]``, ``"digits"``) and as a bare string otherwise.

:func:`validate` checks every value before anything trains and raises :class:`ConfigError` (a
``ValueError``) naming the key and the allowed values. Unknown keys are errors too (typos would
otherwise be silently ignored).

Values the paper leaves open (eps, S, learning rates, Dirichlet alpha) are parameters; defaults for
the CPU-scale digits run were tuned on this machine, eps = 1e-3 follows MeZO, scale = 0.75 is the
paper's Rademacher magnitude for one local step.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import methods as _methods

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10: the tomli backport, if installed
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

#: Federated methods (``method`` key) -> description, from the registry (:mod:`.methods`). Phase 1 =
#: warm-up (FedAvg/FedAdam over high-resource clients), phase 2 = rounds from the pivot on.
METHODS = {n: m.description for n, m in _methods.REGISTRY.items()}
#: Human-readable names used in tables and plots.
METHOD_LABELS = {n: m.label for n, m in _methods.REGISTRY.items()}
DATASETS = ("digits", "cifar10", "imagenet32", "mnist", "npz")
MODELS = ("mlp", "cnn", "resnet18", "vit_small", "vit_b16")
NORMS = ("none", "bn", "gn", "ln")
SERVER_OPTS = ("fedavg", "fedadam")
DISTS = ("rademacher", "gaussian")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
DEVICES = ("auto", "cpu", "cuda")
SEED_SHARING = ("shared", "per_client")
SYNC_MODES = ("broadcast", "lazy")
BN_STATS = ("frozen", "batch", "recompute")

_MAX_SEED = 2 ** 63 - 1


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and what is allowed."""


@dataclass
class DataConfig:
    """Dataset, client split and resource assignment.

    Attributes:
        name: dataset, one of :data:`DATASETS` (``digits`` needs no files; the others read ``root``).
        root: folder (or ``.npz`` file for ``npz``) holding the data; None for ``digits``.
        num_clients: N, number of clients (paper: 50).
        alpha: Dirichlet concentration of the label split (smaller = more skewed), > 0.
        hi_fraction: share of high-resource clients, in [0, 1] (0.1 = the paper's 10/90 split);
            exactly ``round(hi_fraction * N)`` clients are high-resource.
        validation: fraction of every class of the *training* data held out as the evaluation
            set (0 = evaluate on the test split). ``zowarmup sweep`` sets it, so that choosing
            hyper-parameters never sees the test split; the held-out part is the same for every
            seed (``stratified_split`` with seed ``TAG_VAL_SPLIT``) and no client holds it.
    """
    name: str = "digits"
    root: str | None = None
    num_clients: int = 50
    alpha: float = 0.1
    hi_fraction: float = 0.1
    validation: float = 0.0


@dataclass
class ModelConfig:
    """Model architecture (see ``zowarmup.models.build_model``).

    Attributes:
        name: one of :data:`MODELS`.
        norm: normalization layers: ``none``, ``bn`` (BatchNorm, the paper's choice with FedAvg) or
            ``gn`` (GroupNorm, the paper's choice with FedAdam) for mlp / cnn / resnet18; the ViTs
            always use LayerNorm (``ln``; ``none`` is accepted for them and means the same).
        options: extra keyword arguments passed to ``build_model`` (e.g. widths).
    """
    name: str = "mlp"
    norm: str = "none"
    options: dict = field(default_factory=lambda: {"hidden": [128]})


@dataclass
class WarmupConfig:
    """Phase 1: FedAvg / FedAdam over high-resource clients (also the FedAvg part of ``zowarmup_hilo``).

    Attributes:
        server_opt: ``fedavg`` (x += server_lr * mean delta) or ``fedadam`` (server Adam on the
            sample-weighted mean delta, Reddi et al. 2021, no bias correction).
        server_lr: server learning rate (1.0 = plain FedAvg; FedAdam typically 1e-3 .. 1e-1).
        beta1, beta2: FedAdam moment decays in [0, 1).
        tau: FedAdam adaptivity (added to sqrt(v)), > 0.
        client_lr: client SGD learning rate, > 0.
        momentum: client SGD momentum in [0, 1) (state is local to one round).
        weight_decay: client SGD weight decay, >= 0.
        local_epochs: passes over the local data per round (paper: 3).
        batch_size: client SGD batch size (paper: 64).
        clients_per_round: high-resource clients sampled per round (capped at their number);
            0 = all of them.
    """
    server_opt: str = "fedavg"
    server_lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    client_lr: float = 0.2
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_epochs: int = 3
    batch_size: int = 64
    clients_per_round: int = 0


@dataclass
class ZOConfig:
    """Phase 2: seed-only zeroth-order rounds (one ZO step per client on its whole local data).

    The update a client's S projected gradients g_s produce is ``-lr * scale * g_s / S`` along noise
    ``z(seed_s)``; the server weights client i by ``n_i / sum n`` and multiplies by ``server_lr``.

    Attributes:
        num_seeds: S, seeds (perturbation directions) per ZO step.
        eps: finite-difference step (MeZO: 1e-3); the perturbation is ``eps * scale * z``.
        scale: noise magnitude c, in (0, 1] as in the paper (0.75 for one local step, Table 3:
            0.25 / 0.1 / 0.01 for 2 / 4 / 6 local steps).
        lr: ZO learning rate.
        dist: ``rademacher`` (paper's choice) or ``gaussian`` (the ablation).
        local_steps: ZO steps per client per round (paper's default 1; each uses S fresh seeds).
        seed_sharing: ``shared`` (all sampled clients get the same S seeds; broadcast has S entries)
            or ``per_client`` (each client its own S seeds; broadcast has S per client).
        server_opt: ``fedavg`` (replayable from seeds) or ``fedadam`` (not replayable: clients then
            download weights every round, and the accounting counts that).
        server_lr, beta1, beta2, tau: server optimizer settings for phase 2.
        micro_batch: samples per forward when a client evaluates its loss on all its data.
        clients_per_round: clients sampled per ZO round (capped at N); 0 = all N, the paper's
            protocol (A.5: every client takes part in every ZO round) and the default. Sampling
            fewer is a departure for speed, not the paper's method.
        epoch_split: false (default, the paper's main setting): every local step evaluates the
            loss on the whole local data set. true (Table 3's local-steps rows): one round is one
            pass over the local data split over the ``local_steps`` steps (effective batch
            900/450/225/150 for 1/2/4/6 steps in the paper): step k uses the k-th of
            ``local_steps`` near-equal chunks of a per-round shuffle (derived from run seed, round
            and client).
        bn_stats: BatchNorm statistics during ZO rounds (models with BatchNorm only; the paper
            does not say). ``batch`` (the default, chosen by the ablation in
            docs/reproduction.md): the L+/L- forwards normalize with the statistics of each
            micro-batch of the client's data (train-mode BatchNorm, running statistics untouched);
            nothing changes in the protocol. ``frozen``: clients evaluate in eval mode, so the
            running statistics stay at their warm-up values for every ZO round (the project's
            behaviour before issue 12; in the ablation it let ZO rounds lose accuracy).
            ``recompute``: every participating client also returns the BatchNorm statistics of its
            data under the round's global weights (``2 * channels`` floats per layer, counted in
            the upload) and the server replaces its running statistics with their sample-weighted
            average, as FedAvg does for buffers in the warm-up. Embedded runner only (a
            deployment would need a new message field). The server evaluates in eval mode with
            its running statistics in every mode.
    """
    num_seeds: int = 20
    eps: float = 1e-3
    scale: float = 0.75
    lr: float = 0.1
    dist: str = "rademacher"
    local_steps: int = 1
    seed_sharing: str = "per_client"
    server_opt: str = "fedavg"
    server_lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    micro_batch: int = 256
    clients_per_round: int = 0
    epoch_split: bool = False
    bn_stats: str = "batch"
    sync: str = "broadcast"
    backend: str = "auto"
    exact: bool = False


@dataclass
class KSeedConfig:
    """FedKSeed (Qin et al. 2024): a finite pool of K seeds, several local ZO steps per client.

    Each local step draws one seed uniformly from the pool, estimates one projected gradient on a
    mini-batch with unscaled Gaussian noise (``scale = 1``, ``dist = "gaussian"``: FedKSeed's
    MeZO-style step), updates the local model and adds the scalar to that seed's accumulator; the
    client uploads its (index, accumulated scalar) pairs and the server broadcasts the weighted
    sums per seed. Its noise, eps, lr and steps are its own (not ``zo.*``); it shares
    ``zo.micro_batch``, ``zo.clients_per_round``, ``zo.sync`` and ``zo.server_lr``.

    ``fedkseed`` (from a random init) runs ``local_steps`` steps of ``batch_size`` samples per
    round; ``zowarmup_fedkseed`` (Table 2: FedKSeed as ZOWarmUp's phase 2) runs
    ``after_warmup_steps`` steps of ``after_warmup_batch_size`` samples (default: one step on the
    whole local data, as ZOWarmUp's own step).

    Attributes:
        pool_size: K, seeds in the shared pool (FedKSeed's candidate seeds; 1024 here).
        local_steps: ZO steps per client per round for ``fedkseed`` ("many": FedKSeed's point is
            several cheap local steps).
        lr: local ZO learning rate (tuned by ``zowarmup sweep`` on digits' validation split).
        scale: noise magnitude c (1.0 = unscaled, FedKSeed).
        eps: finite-difference step (MeZO's 1e-3, on which FedKSeed's step is built).
        dist: ``gaussian`` (FedKSeed) or ``rademacher``.
        batch_size: samples per local step for ``fedkseed``; 0 = the whole local data set.
        after_warmup_steps: local steps per round for ``zowarmup_fedkseed`` (Table 2: 1).
        after_warmup_batch_size: samples per step for ``zowarmup_fedkseed``; 0 = whole local data.
    """
    pool_size: int = 1024
    local_steps: int = 20
    lr: float = 0.02
    scale: float = 1.0
    eps: float = 1e-3
    dist: str = "gaussian"
    batch_size: int = 16
    after_warmup_steps: int = 1
    after_warmup_batch_size: int = 0

    def for_method(self, method: str) -> "KSeedConfig":
        """The settings a run of ``method`` uses: ``zowarmup_fedkseed`` takes its
        ``after_warmup_*`` steps and batch size; other methods these settings as they are."""
        if method == "zowarmup_fedkseed":
            return dataclasses.replace(self, local_steps=self.after_warmup_steps,
                                       batch_size=self.after_warmup_batch_size)
        return self


@dataclass
class HeteroFLConfig:
    """HeteroFL (Diao et al. 2021), the Table 2 baseline; local SGD uses the ``warmup`` section's
    client settings (lr, momentum, weight decay, epochs, batch size).

    Attributes:
        lo_rate: width rate of low-resource clients' sub-networks (paper section 4.1: half width).
        budget_rounds: rounds the communication budget buys at ``budget_hi_fraction``
            (0 = ``rounds``).
        budget_hi_fraction: the high-resource share the budget is set at; a larger share costs
            more per round, so a run gets fewer rounds (methods/heterofl.py).
    """
    lo_rate: float = 0.5
    budget_rounds: int = 0
    budget_hi_fraction: float = 0.1


@dataclass
class RunConfig:
    """One federated experiment. ``zowarmup run`` trains ``method`` and every entry of ``baselines``
    for each of ``num_seeds`` seeds (``seed``, ``seed + 1``, ...), all on the same data split per seed.

    Attributes:
        name: run name (folder prefix).
        method: one of :data:`METHODS`.
        baselines: methods trained beside ``method`` with the same settings (default: High Res Only).
        seed: base random seed (data split, resource assignment, init, sampling, ZO seeds).
        num_seeds: how many consecutive seeds to run.
        rounds: R, total communication rounds.
        pivot: first ZO round (paper: 200 of 500); rounds [0, pivot) are the warm-up. Forced to
            ``rounds`` for ``high_res_only`` and 0 for ``zo_only`` / ``fedkseed``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        eval_every: evaluate the global model every this many rounds (and at the pivot and the end).
        eval_batch_size: samples per forward during evaluation.
        checkpoint_every: write a checkpoint every this many rounds (0 = only at the end).
        measure_memory: measure peak memory of a client's ZO and backprop step for the model.
        threads: torch CPU threads (0 = leave torch's default). The default digits run uses 1:
            its forwards are tiny and a second thread only adds synchronization (measured 15 ms
            vs 90 ms per client ZO step on the shared 2-core machine).
        progress: show a progress bar during rounds.
    """
    name: str = "digits"
    method: str = "zowarmup"
    baselines: list = field(default_factory=lambda: ["high_res_only"])
    seed: int = 0
    num_seeds: int = 3
    rounds: int = 100
    pivot: int = 40
    device: str = "auto"
    eval_every: int = 1
    eval_batch_size: int = 1024
    checkpoint_every: int = 10
    measure_memory: bool = True
    threads: int = 1
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    fedkseed: KSeedConfig = field(default_factory=KSeedConfig)
    heterofl: HeteroFLConfig = field(default_factory=HeteroFLConfig)

    # -- helpers -------------------------------------------------------------------------------
    def effective_pivot(self) -> int:
        """First phase-2 round for this method (``rounds`` when there is no phase 2)."""
        return _methods.get(self.method).pivot(self.rounds, self.pivot)

    def phase(self, round_idx: int) -> str:
        """``"warmup"``, ``"zo"``, ``"fedkseed"`` or ``"hilo"``: what round ``round_idx`` runs."""
        return _methods.get(self.method).phase_name(round_idx, self.rounds, self.pivot)

    def to_dict(self) -> dict:
        """Plain nested dict (JSON-serializable)."""
        return dataclasses.asdict(self)

    def for_run(self, method: str, seed: int) -> "RunConfig":
        """A copy describing one training run: this ``method`` and ``seed``, no baselines,
        ``num_seeds = 1``, and the effective pivot written out."""
        c = copy.deepcopy(self)
        c.method, c.seed, c.baselines, c.num_seeds = method, int(seed), [], 1
        m = _methods.get(method)
        if m.rounds is not None:
            c.rounds = m.rounds(c)
        c.pivot = c.effective_pivot()
        return c


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "warmup": WarmupConfig, "zo": ZOConfig,
             "fedkseed": KSeedConfig, "heterofl": HeteroFLConfig}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(d: dict, base: RunConfig | None = None) -> RunConfig:
    """Build a config from a nested dict (as read from TOML/JSON) on top of ``base`` (defaults).

    Raises :class:`ConfigError` for unknown keys or sections, naming the allowed ones. Values are
    not validated here; call :func:`validate`.
    """
    cfg = copy.deepcopy(base) if base is not None else RunConfig()
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a table/object at the top level, got {type(d).__name__}")
    top = _field_names(RunConfig)
    for key, value in d.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section [{key}] must be a table, got {value!r}")
            sec = getattr(cfg, key)
            allowed = _field_names(_SECTIONS[key])
            for k2, v2 in value.items():
                if k2 not in allowed:
                    raise ConfigError(f"unknown config key '{key}.{k2}'; allowed keys in [{key}]: "
                                      f"{', '.join(allowed)}")
                setattr(sec, k2, copy.deepcopy(v2))
        elif key in top:
            setattr(cfg, key, copy.deepcopy(value))
        else:
            raise ConfigError(f"unknown config key '{key}'; allowed top-level keys: "
                              f"{', '.join(k for k in top if k not in _SECTIONS)}; sections: "
                              f"{', '.join(_SECTIONS)}")
    return cfg


def load_file(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a ``.toml`` or ``.json`` config file on top of ``base`` (defaults when None).

    Raises FileNotFoundError when missing, :class:`ConfigError` when it does not parse or has
    unknown keys.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} "
                          f"at offset {e.start})") from None
    if p.suffix != ".json" and tomllib is None:
        raise ConfigError(f"cannot read {p}: TOML needs Python >= 3.11 (tomllib) or the 'tomli' "
                          "package; install tomli or give a .json config")
    try:
        if p.suffix == ".json":
            d = json.loads(text)
        else:
            d = tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as e:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot parse config file {p}: {e}") from None
    # A saved run config (config.json in a run folder) is accepted as input as well.
    try:
        return from_dict(d, base)
    except ConfigError as e:
        raise ConfigError(f"config file {p}: {e}") from None


def _parse_value(text: str) -> Any:
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli: JSON literals only
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return None if text.lower() in ("none", "null") else text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except ValueError:
        if text.lower() in ("none", "null"):
            return None
        return text


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` strings (dotted keys for sections) to a copy of ``cfg``.

    Raises :class:`ConfigError` for a malformed item or an unknown key (naming the allowed keys).
    """
    d: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. zo.num_seeds=10)")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] in _SECTIONS:
                raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. {key}."
                                  f"{_field_names(_SECTIONS[key])[0]}=...")
            d[parts[0]] = _parse_value(text)
        elif len(parts) == 2 and parts[0] in _SECTIONS:
            d.setdefault(parts[0], {})[parts[1]] = _parse_value(text)
        elif len(parts) == 3 and parts[0] == "model" and parts[1] == "options":
            d.setdefault("model", {}).setdefault("options", dict(cfg.model.options))[parts[2]] = \
                _parse_value(text)
        else:
            raise ConfigError(f"unknown config key '{key}'; use a top-level key or "
                              f"section.key with sections {', '.join(_SECTIONS)}")
    return from_dict(d, cfg)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _choice(key, v, allowed):
    if v not in allowed:
        raise ConfigError(f"invalid value {v!r} for '{key}'; allowed values: "
                          f"{', '.join(map(repr, allowed))}")


#: Upper bound of ``rounds`` (a million rounds is far beyond any run; larger values are typos).
MAX_ROUNDS = 1_000_000


def _int(key, v, lo=None, hi=None):
    if not _is_int(v):
        raise ConfigError(f"invalid value {v!r} for '{key}'; expected an integer"
                          + (f" >= {lo}" if lo is not None else ""))
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"invalid value {v!r} for '{key}'; allowed range: {rng}")


def _real(key, v, lo=None, hi=None, lo_open=False, hi_open=False):
    if not _is_real(v):
        raise ConfigError(f"invalid value {v!r} for '{key}'; expected a finite number")
    v = float(v)
    bad = ((lo is not None and (v <= lo if lo_open else v < lo))
           or (hi is not None and (v >= hi if hi_open else v > hi)))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ConfigError(f"invalid value {v!r} for '{key}'; allowed range: {left}"
                          f"{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; raise :class:`ConfigError` naming the first bad key and what is allowed.

    Integer keys must hold integers (``3.0`` is rejected); real-valued keys accept ints. Returns
    ``cfg`` for chaining; changes nothing.
    """
    if not isinstance(cfg.name, str) or not cfg.name or any(c in cfg.name for c in "/\\\0"):
        raise ConfigError(f"invalid value {cfg.name!r} for 'name'; expected a non-empty string "
                          "without path separators")
    _choice("method", cfg.method, tuple(METHODS))
    if not isinstance(cfg.baselines, list):
        raise ConfigError(f"invalid value {cfg.baselines!r} for 'baselines'; expected a list of "
                          f"methods from {', '.join(map(repr, METHODS))}")
    for i, b in enumerate(cfg.baselines):
        _choice(f"baselines[{i}]", b, tuple(METHODS))
    if cfg.method in cfg.baselines or len(set(cfg.baselines)) != len(cfg.baselines):
        raise ConfigError(f"invalid value {cfg.baselines!r} for 'baselines'; each method may "
                          f"appear once and not repeat method={cfg.method!r}")
    _int("seed", cfg.seed, 0, _MAX_SEED)
    _int("num_seeds", cfg.num_seeds, 1, 1000)
    _int("rounds", cfg.rounds, 1, MAX_ROUNDS)
    _int("pivot", cfg.pivot, 0, cfg.rounds)
    _choice("device", cfg.device, DEVICES)
    _int("eval_every", cfg.eval_every, 1)
    _int("eval_batch_size", cfg.eval_batch_size, 1)
    _int("checkpoint_every", cfg.checkpoint_every, 0)
    _int("threads", cfg.threads, 0)
    for k in ("measure_memory", "progress"):
        if not isinstance(getattr(cfg, k), bool):
            raise ConfigError(f"invalid value {getattr(cfg, k)!r} for '{k}'; allowed values: true, false")

    d = cfg.data
    _choice("data.name", d.name, DATASETS)
    if d.root is not None and not isinstance(d.root, str):
        raise ConfigError(f"invalid value {d.root!r} for 'data.root'; expected a path string")
    if d.name != "digits" and not d.root:
        raise ConfigError(f"'data.root' is required for data.name={d.name!r} (only 'digits' is "
                          "built in); give the folder (or .npz file) holding the data")
    _int("data.num_clients", d.num_clients, 1)
    _real("data.alpha", d.alpha, 0, None, lo_open=True)
    _real("data.hi_fraction", d.hi_fraction, 0.0, 1.0)
    _real("data.validation", d.validation, 0.0, 1.0, hi_open=True)

    m = cfg.model
    _choice("model.name", m.name, MODELS)
    _choice("model.norm", m.norm, NORMS)
    if m.name.startswith("vit") and m.norm not in ("ln", "none"):
        raise ConfigError(f"invalid value {m.norm!r} for 'model.norm' with model.name={m.name!r}; "
                          "allowed values: 'ln', 'none' (ViTs use LayerNorm)")
    if not m.name.startswith("vit") and m.norm == "ln":
        raise ConfigError(f"invalid value 'ln' for 'model.norm' with model.name={m.name!r}; "
                          "allowed values: 'none', 'bn', 'gn'")
    if not isinstance(m.options, dict):
        raise ConfigError(f"invalid value {m.options!r} for 'model.options'; expected a table")

    w = cfg.warmup
    _choice("warmup.server_opt", w.server_opt, SERVER_OPTS)
    _real("warmup.server_lr", w.server_lr, 0, None, lo_open=True)
    _real("warmup.beta1", w.beta1, 0.0, 1.0, hi_open=True)
    _real("warmup.beta2", w.beta2, 0.0, 1.0, hi_open=True)
    _real("warmup.tau", w.tau, 0, None, lo_open=True)
    _real("warmup.client_lr", w.client_lr, 0, None, lo_open=True)
    _real("warmup.momentum", w.momentum, 0.0, 1.0, hi_open=True)
    _real("warmup.weight_decay", w.weight_decay, 0.0)
    _int("warmup.local_epochs", w.local_epochs, 1)
    _int("warmup.batch_size", w.batch_size, 1)
    _int("warmup.clients_per_round", w.clients_per_round, 0)

    z = cfg.zo
    _int("zo.num_seeds", z.num_seeds, 1, 1 << 20)
    _real("zo.eps", z.eps, 0, None, lo_open=True)
    _real("zo.scale", z.scale, 0, 1, lo_open=True)
    _real("zo.lr", z.lr, 0, None, lo_open=True)
    _choice("zo.dist", z.dist, DISTS)
    _int("zo.local_steps", z.local_steps, 1, 1 << 16)
    _choice("zo.seed_sharing", z.seed_sharing, SEED_SHARING)
    _choice("zo.server_opt", z.server_opt, SERVER_OPTS)
    _real("zo.server_lr", z.server_lr, 0, None, lo_open=True)
    _real("zo.beta1", z.beta1, 0.0, 1.0, hi_open=True)
    _real("zo.beta2", z.beta2, 0.0, 1.0, hi_open=True)
    _real("zo.tau", z.tau, 0, None, lo_open=True)
    _int("zo.micro_batch", z.micro_batch, 1)
    _int("zo.clients_per_round", z.clients_per_round, 0)
    _choice("zo.bn_stats", z.bn_stats, BN_STATS)
    _choice("zo.sync", z.sync, SYNC_MODES)
    _choice("zo.backend", z.backend, BACKENDS)
    if not isinstance(z.epoch_split, bool):
        raise ConfigError(f"invalid value {z.epoch_split!r} for 'zo.epoch_split'; allowed values: "
                          "true, false")
    if not isinstance(z.exact, bool):
        raise ConfigError(f"invalid value {z.exact!r} for 'zo.exact'; allowed values: true, false")

    k = cfg.fedkseed
    _int("fedkseed.pool_size", k.pool_size, 1, 1 << 32)
    _int("fedkseed.local_steps", k.local_steps, 1, 1 << 16)
    _real("fedkseed.lr", k.lr, 0, None, lo_open=True)
    _real("fedkseed.scale", k.scale, 0, 1, lo_open=True)
    _real("fedkseed.eps", k.eps, 0, None, lo_open=True)
    _choice("fedkseed.dist", k.dist, DISTS)
    _int("fedkseed.batch_size", k.batch_size, 0)
    _int("fedkseed.after_warmup_steps", k.after_warmup_steps, 1, 1 << 16)
    _int("fedkseed.after_warmup_batch_size", k.after_warmup_batch_size, 0)

    h = cfg.heterofl
    _real("heterofl.lo_rate", h.lo_rate, 0, 1, lo_open=True)
    _int("heterofl.budget_rounds", h.budget_rounds, 0)
    _real("heterofl.budget_hi_fraction", h.budget_hi_fraction, 0.0, 1.0)
    if "heterofl" in [cfg.method] + list(cfg.baselines) and m.name not in ("mlp", "cnn", "resnet18"):
        raise ConfigError(f"method 'heterofl' slices widths of the mlp, cnn and resnet18 families; "
                          f"model.name={m.name!r} is not one of them")

    # cross-field checks, for the main method and every baseline
    n_hi = int(round(d.hi_fraction * d.num_clients))
    for meth in [cfg.method] + list(cfg.baselines):
        c = cfg.for_run(meth, cfg.seed)
        if c.effective_pivot() > 0 and n_hi == 0:
            raise ConfigError(f"method {meth!r} warms up on high-resource clients but "
                              f"data.hi_fraction={d.hi_fraction} x data.num_clients={d.num_clients} "
                              "gives none; raise 'data.hi_fraction' (allowed: > 0.5/num_clients)")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the file at ``path`` (if any), then ``overrides``; validated."""
    cfg = RunConfig()
    if path is not None:
        cfg = load_file(path, cfg)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return validate(cfg)
