"""The setup every round driver shares: device, data, client shards, resources, the global model,
the server, the client factory and the round's sampling.

Embedded runs (:mod:`.loop`), in-memory deployments (:mod:`.deploy`) and Flower (server and client
apps) build their federation here, so they agree bit for bit on every random choice: the initial
model (``torch.manual_seed(derive_seed(seed, TAG_INIT) >> 1)``), the Dirichlet split, the hi/lo
assignment, the clients of each round (torch's RNG reseeded with ``derive_seed(seed, TAG_ROUND, r)``
first) and, on CUDA, deterministic cuDNN.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as zdata
from .. import models as zmodels
from ..seeds import TAG_INIT, TAG_ROUND, TAG_VAL_SPLIT, derive_seed
from .client import Client
from .config import ConfigError, RunConfig
from .server import Server

__all__ = ["Federation", "resolve_device", "build_global_model", "client_shards", "make_client",
           "sample_round", "evaluate"]


def validation_dataset(ds, fraction: float):
    """``ds`` with a stratified ``fraction`` of its training data as the evaluation split
    (``data.validation``) and the rest as training data; the test split is dropped. The same rows
    for every run seed (``stratified_split`` with seed ``TAG_VAL_SPLIT``)."""
    import dataclasses as _dc
    tr, va = zdata.stratified_split(ds.y_train.numpy(), fraction, TAG_VAL_SPLIT)
    tr, va = torch.as_tensor(tr), torch.as_tensor(va)
    return _dc.replace(ds, x_train=ds.x_train[tr], y_train=ds.y_train[tr],
                       x_test=ds.x_train[va], y_test=ds.y_train[va], name=f"{ds.name}-validation")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU raises ValueError.

    On CUDA, cuDNN is made deterministic (and its autotuner off), so that every process of a
    federation computes the same bits."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu' or 'auto'")
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return dev


def build_global_model(cfg: RunConfig, ds) -> torch.nn.Module:
    """The initial global model: ``build_model`` under ``torch.manual_seed(derive_seed(seed, TAG))``,
    so every client can rebuild version 0 from the run seed."""
    torch.manual_seed(derive_seed(cfg.seed, TAG_INIT) >> 1)
    norm = cfg.model.norm
    if cfg.model.name.startswith("vit"):
        norm = None if norm in ("none", "ln") else norm
    try:
        return zmodels.build_model(cfg.model.name, ds.num_classes, ds.in_channels, ds.image_size,
                                   norm=norm, **cfg.model.options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model.name={cfg.model.name!r} with model.norm="
                          f"{cfg.model.norm!r}, model.options={cfg.model.options!r} for "
                          f"{ds.name} ({ds.in_channels}x{ds.image_size}x{ds.image_size}): {e}") from None


def client_shards(cfg: RunConfig, ds) -> list:
    """The Dirichlet label split of ``ds``'s training set into ``data.num_clients`` shards (index
    arrays), deterministic in ``cfg.seed``; shard i is client i's data in every runner."""
    return zdata.dirichlet_partition(ds.y_train, cfg.data.num_clients, cfg.data.alpha, cfg.seed,
                                     num_classes=ds.num_classes)


def make_client(cfg: RunConfig, ds, shard, cid: int, device, pool=None) -> Client:
    """Client ``cid`` holding ``ds``'s training samples ``shard`` on ``device``."""
    return Client(cid, ds.x_train[torch.as_tensor(shard)].to(device),
                  ds.y_train[torch.as_tensor(shard)].to(device), cfg.seed, cfg.warmup, cfg.zo,
                  cfg.fedkseed.for_method(cfg.method), pool)


def sample_round(cfg: RunConfig, r: int, phase: str, hi_ids) -> list[int]:
    """The clients taking part in round ``r`` (``phase`` = ``cfg.phase(r)``): a draw from the
    high-resource clients ``hi_ids`` during warm-up, from all N afterwards."""
    N = cfg.data.num_clients
    if phase == "warmup":
        k = cfg.warmup.clients_per_round or len(hi_ids)
        ids = zdata.sample_clients(N, min(k, len(hi_ids)), r, cfg.seed, candidates=hi_ids)
    else:
        k = min(cfg.zo.clients_per_round or N, N)
        ids = zdata.sample_clients(N, k, r, cfg.seed)
    return [int(c) for c in ids]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` in eval mode on (x, y)."""
    model.eval()
    correct, loss, n = 0, 0.0, x.shape[0]
    for i in range(0, n, batch):
        out = model(x[i:i + batch]).float()
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return correct / max(n, 1), loss / max(n, 1)


class Federation:
    """One run's federation: what the server side of every driver holds.

    Args:
        cfg: one run's validated config (``cfg.for_run(method, seed)``).
        dataset: an already loaded ``zowarmup.data.Dataset``; loaded from ``cfg.data`` when None.
        clients: also build the N in-process clients (the embedded runner; a deployment's clients
            live elsewhere).

    Attributes: ``cfg``, ``device``, ``dataset``, ``hi`` (bool mask of high-resource clients),
    ``hi_ids``, ``model`` (the global model), ``server``, ``clients`` (or None), ``shards`` (or
    None), ``x_test``, ``y_test`` (on the device), ``pivot``.
    """

    def __init__(self, cfg: RunConfig, dataset=None, clients: bool = True):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        ds = dataset if dataset is not None else zdata.load_dataset(cfg.data.name, cfg.data.root)
        if cfg.data.validation > 0:
            ds = validation_dataset(ds, cfg.data.validation)
        self.dataset = ds
        N = cfg.data.num_clients
        if N > ds.x_train.shape[0]:
            raise ValueError(f"data.num_clients={N} exceeds the {ds.x_train.shape[0]} training "
                             f"samples of {ds.name}")
        self.hi = zdata.assign_resources(N, cfg.data.hi_fraction, cfg.seed)
        self.hi_ids = np.flatnonzero(self.hi)
        self.model = build_global_model(cfg, ds).to(self.device)
        self.server = Server(cfg, self.model, N, ds)
        self.shards = self.clients = None
        if clients:
            self.shards = client_shards(cfg, ds)
            self.clients = [make_client(cfg, ds, s, i, self.device, self.server.pool)
                            for i, s in enumerate(self.shards)]
        self.x_test, self.y_test = ds.x_test.to(self.device), ds.y_test.to(self.device)
        self.pivot = cfg.effective_pivot()

    def sample(self, r: int, phase: str) -> list[int]:
        """Reseed torch's RNG for round ``r`` and draw its clients (:func:`sample_round`)."""
        torch.manual_seed(derive_seed(self.cfg.seed, TAG_ROUND, r) >> 1)
        return sample_round(self.cfg, r, phase, self.hi_ids)

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, loss) of the global model on the test split."""
        return evaluate(self.model, self.x_test, self.y_test, self.cfg.eval_batch_size)
