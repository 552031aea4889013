"""Client-side logic of the federated protocol: one message in, one message out.

A :class:`Client` owns a client's local data and settings, not a model: every method takes the model
it should work on, which lets the embedded runner reuse one worker model for all clients and lets a
deployment (Flower) keep one persistent model per client process. Nothing here knows about rounds
loops, sampling or transport.

- :meth:`Client.fit_warmup`: WeightsMessage (global state) -> WeightsMessage (state after local SGD).
- :meth:`Client.fit_zo`: SeedsMessage -> GradsMessage. The model must hold the round's global
  weights. One ZO step per local step on the whole local dataset (loss in micro-batches under
  ``torch.no_grad``; BatchNorm as ``zo.bn_stats`` says (default ``batch``: the batch's statistics,
  running statistics never updated; ``frozen``: the running statistics; :mod:`.bn`).
- :meth:`Client.fit_kseed`: KSeedTask -> KSeedUpdate (FedKSeed local steps over the seed pool).
- :meth:`Client.fit_heterofl`: SubModelTask -> SubModelUpdate (HeteroFL: local SGD on the
  width-sliced sub-network, masked loss; the trained slice and the client's classes back).
- :meth:`Client.fit_statistics`: StatsRequest -> StatsMessage (BatchNorm statistics of the local
  data under the given global state: HeteroFL's sBN).
- :meth:`Client.apply_broadcast`: BroadcastMessage -> model updated in place with ``apply_seeds_``.

Exactness. ``ZOOptimizer.estimate`` restores the weights by adding back (+eps, -2 eps, +eps), which
is not bit-exact in floating point (docs/DESIGN.md, "The ZO step"). A persistent client that must keep weights
bit-identical to the server's passes ``exact=True`` (or sets ``zo.exact``) to
:meth:`Client.fit_zo`: the perturbed weights are written into a scratch buffer the size of the
largest layer and the stored weights are never touched (:mod:`.exact`); or ``snapshot=True``
(also :meth:`Client.fit_kseed`): the weights are copied before and restored after (one extra copy
of the parameters, so not inference-level memory). Without it, after one ZO step with S seeds and the
round's broadcast, each element is within ``(2 S + 2) * ulp(max(|w|, |w'|) + 2 eps c)`` of the
server's (w before, w' after the round; checked in ``tests/test_federated.py``), and the drift
accumulates over rounds. The embedded runner needs neither, because it reloads the worker model
from the server before each client.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import zo_kernels

from ..optim import ZOOptimizer
from ..optim.exact import ScratchPerturbation, exact_estimate
from ..optim.functional import update_coeff, update_coeffs
from ..seeds import derive_seed, TAG_SGD, TAG_KSEED_INDEX, TAG_KSEED_BATCH, TAG_ZO_SPLIT
from .bn import bn_mode
from .config import KSeedConfig, WarmupConfig, ZOConfig
from .messages import (BroadcastMessage, GradsMessage, KSeedTask, KSeedUpdate, SeedsMessage,
                       StatsMessage, StatsRequest, SubModelTask, SubModelUpdate, WeightsMessage)
from .state import StateLayout


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model contains a BatchNorm layer (batches of one sample are then skipped)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def dataset_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch: int) -> float:
    """Mean cross-entropy of ``model`` over all of (x, y), computed in micro-batches.

    Args:
        x: (n, C, H, W) float tensor on the model's device; y: (n,) int64 labels.
        micro_batch: samples per forward; peak activation memory is that of one micro-batch.

    Returns:
        The mean loss as a Python float (summed in float64 over micro-batches, in order).
    """
    n = x.shape[0]
    total = 0.0
    for i in range(0, n, micro_batch):
        out = model(x[i:i + micro_batch])
        total += float(F.cross_entropy(out.float(), y[i:i + micro_batch], reduction="sum"))
    return total / max(n, 1)


class Client:
    """One client's data and settings; stateless apart from that.

    Args:
        cid: client id in ``[0, N)``.
        x: (n_i, C, H, W) float32 local inputs (on the training device).
        y: (n_i,) int64 local labels.
        run_seed: the run's seed (local shuffles and FedKSeed choices derive from it).
        warmup: phase-1 settings (client SGD).
        zo: phase-2 settings (eps, scale, lr, dist, micro-batch, backend).
        kseed: FedKSeed settings.
        pool: FedKSeed's shared seed pool (K uint64 seeds), or None.
    """

    def __init__(self, cid: int, x: torch.Tensor, y: torch.Tensor, run_seed: int,
                 warmup: WarmupConfig, zo: ZOConfig, kseed: KSeedConfig | None = None,
                 pool: np.ndarray | None = None):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"client {cid}: {x.shape[0]} inputs but {y.shape[0]} labels")
        self.cid = int(cid)
        self.x, self.y = x, y
        self.run_seed = int(run_seed)
        self.warmup, self.zo = warmup, zo
        self.kseed = kseed or KSeedConfig()
        self.pool = pool

    @property
    def num_samples(self) -> int:
        """n_i, the local sample count."""
        return int(self.x.shape[0])

    # -- phase 1 ---------------------------------------------------------------------------------
    def fit_warmup(self, model: nn.Module, msg: WeightsMessage, layout: StateLayout | None = None
                   ) -> WeightsMessage:
        """Load the global state from ``msg``, run local SGD, return the new local state.

        ``warmup.local_epochs`` passes over the local data in shuffled batches of
        ``warmup.batch_size`` (the shuffle derives from (run seed, round, client), so it is
        reproducible); momentum buffers live for this call only. A trailing batch of one sample is
        skipped when the model has BatchNorm (train-mode BatchNorm needs two samples).
        """
        layout = layout or StateLayout(model)
        layout.load(model, msg.values)
        cfg = self.warmup
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.client_lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(derive_seed(self.run_seed, TAG_SGD, msg.round, self.cid)
                                            >> 1)
        bn = has_batchnorm(model)
        model.train()
        n = self.num_samples
        for _ in range(cfg.local_epochs):
            perm = torch.randperm(n, generator=gen).to(self.x.device)
            for i in range(0, n, cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                if bn and idx.numel() < 2:
                    continue
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(self.x[idx]), self.y[idx])
                loss.backward()
                opt.step()
        opt.zero_grad(set_to_none=True)
        return WeightsMessage(msg.round, layout.flatten(model), self.num_samples)

    # -- phase 2: ZO -----------------------------------------------------------------------------
    def _optimizer(self, model: nn.Module, lr: float, scale: float, num_samples: int,
                   eps: float | None = None, dist: str | None = None):
        return ZOOptimizer(list(model.parameters()), lr=lr,
                           eps=self.zo.eps if eps is None else eps, num_samples=num_samples,
                           dist=self.zo.dist if dist is None else dist, scale=scale,
                           backend=self.zo.backend)

    def fit_zo(self, model: nn.Module, msg: SeedsMessage, snapshot: bool = False,
               exact: bool | None = None) -> GradsMessage:
        """One ZO step per local step on the whole local dataset; return the projected gradients.

        For local step k with seeds ``s_0..s_{S-1}`` (``msg.seeds[k*S:(k+1)*S]``):
        ``g_s = (L(w + eps c z_s) - L(w - eps c z_s)) / (2 eps)`` with L the mean loss over all
        local samples. Between local steps the client applies its own update
        ``-lr * c * g_s / S`` along ``z_s``; after the last step nothing is applied (the round's
        update arrives in the broadcast).

        Args:
            model: holds the round's global weights; left at them (exactly with ``snapshot`` or
                ``exact``, else up to restore rounding; with several local steps and neither the
                local updates stay applied and the caller must re-sync the model).
            msg: the server's seeds.
            snapshot: copy the parameters first and restore them bit-exactly at the end (one
                extra copy of the parameters).
            exact: evaluate the perturbed weights in a scratch buffer (:mod:`.exact`): the
                stored weights are never written, memory grows by the largest layer only, and
                local updates between steps are folded into the scratch copy. The projected
                gradients differ from the in-place mode's in the last bits (L- is evaluated at
                ``fl(w - eps c z)`` instead of ``fl(fl(w + eps c z) - 2 eps c z)``). None:
                ``zo.exact``.

        Returns:
            GradsMessage with ``steps * S`` float32 values (NaN/inf when the loss was not finite:
            the server drops such clients).
        """
        exact = self.zo.exact if exact is None else bool(exact)
        steps, S = msg.steps, msg.per_step
        seeds = [int(s) for s in msg.seeds]
        mb = self.zo.micro_batch
        chunks = self._step_data(msg.round, steps)
        cur = [0]  # the local step whose data the closure reads

        def closure():
            xs, ys = chunks[cur[0]]
            return dataset_loss(model, xs, ys, mb)

        with bn_mode(model, self.zo.bn_stats):
            return self._fit_zo(model, msg, closure, cur, steps, S, seeds, snapshot, exact)

    def _step_data(self, round_idx: int, steps: int) -> list:
        """(x, y) each local step evaluates: the whole local data for every step, or with
        ``zo.epoch_split`` the k-th of ``steps`` near-equal chunks of a shuffle derived from
        (run seed, round, client), so one round is one pass over the data (Table 3)."""
        if not self.zo.epoch_split or steps == 1:
            return [(self.x, self.y)] * steps
        gen = torch.Generator().manual_seed(
            derive_seed(self.run_seed, TAG_ZO_SPLIT, round_idx, self.cid) >> 1)
        perm = torch.randperm(self.num_samples, generator=gen).to(self.x.device)
        return [(self.x[p], self.y[p]) for p in torch.tensor_split(perm, steps)]

    def _fit_zo(self, model, msg, closure, cur, steps, S, seeds, snapshot, exact) -> GradsMessage:

        grads: list[float] = []
        if exact:
            sp = ScratchPerturbation(model, self.zo.dist, self.zo.backend)
            pre: list = []
            for k in range(steps):
                cur[0] = k
                ks = seeds[k * S:(k + 1) * S]
                g, _ = exact_estimate(model, closure, ks, self.zo.eps, self.zo.scale,
                                      self.zo.dist, self.zo.backend, pre, sp)
                grads.extend(g)
                if not all(math.isfinite(v) for v in g):
                    grads.extend([float("nan")] * (len(seeds) - len(grads)))
                    break
                pre.append((ks, update_coeffs(g, self.zo.lr, self.zo.scale)))
            return GradsMessage(msg.round, np.asarray(grads, dtype=np.float32), self.num_samples)

        params = list(model.parameters())
        saved = [p.detach().clone() for p in params] if snapshot else None
        opt = self._optimizer(model, self.zo.lr, self.zo.scale, S)
        try:
            for k in range(steps):
                cur[0] = k
                ks = seeds[k * S:(k + 1) * S]
                est = opt.estimate(closure, seeds=ks)
                g = [float(v) for v in est.projected_grads]
                grads.extend(g)
                if not all(math.isfinite(v) for v in g):
                    grads.extend([float("nan")] * (len(seeds) - len(grads)))
                    break
                if k + 1 < steps:
                    opt.apply(ks, update_coeffs(g, self.zo.lr, self.zo.scale))
        finally:
            if saved is not None:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
        return GradsMessage(msg.round, np.asarray(grads, dtype=np.float32), self.num_samples)

    def fit_kseed(self, model: nn.Module, msg: KSeedTask, snapshot: bool = False) -> KSeedUpdate:
        """FedKSeed local training: ``msg.steps`` ZO steps, each along one seed of the pool.

        Noise, eps, lr and c are FedKSeed's own (``fedkseed.dist/eps/lr/scale``). Step t uses pool
        index ``derive_seed(run_seed, TAG, round, cid, t) % K`` (uniform over the pool up to a
        2^-64-relative bias) and a mini-batch of
        ``kseed.batch_size`` samples (0 = all), updates the local model by ``-lr * c * g`` and adds
        g to that index's accumulator. Returns the (index, accumulated g) pairs, indices ascending.
        """
        if self.pool is None:
            raise ValueError("fit_kseed needs the seed pool (Client(..., pool=...))")
        cfg = self.kseed
        K = len(self.pool)
        params = list(model.parameters())
        saved = [p.detach().clone() for p in params] if snapshot else None
        opt = self._optimizer(model, cfg.lr, cfg.scale, 1, eps=cfg.eps, dist=cfg.dist)
        model.eval()
        n, mb = self.num_samples, self.zo.micro_batch
        acc: dict[int, float] = {}
        try:
            for t in range(msg.steps):
                k = derive_seed(self.run_seed, TAG_KSEED_INDEX, msg.round, self.cid, t) % K
                if 0 < cfg.batch_size < n:
                    gen = torch.Generator().manual_seed(
                        derive_seed(self.run_seed, TAG_KSEED_BATCH, msg.round, self.cid, t) >> 1)
                    idx = torch.randperm(n, generator=gen)[:cfg.batch_size].to(self.x.device)
                    xb, yb = self.x[idx], self.y[idx]
                else:
                    xb, yb = self.x, self.y
                seed = int(self.pool[k])
                est = opt.estimate(lambda: dataset_loss(model, xb, yb, mb), seeds=[seed])
                g = float(est.projected_grads[0])
                acc[k] = acc.get(k, 0.0) + g
                if not math.isfinite(g):
                    break
                opt.apply([seed], [update_coeff(g, cfg.lr, cfg.scale, 1)])
        finally:
            if saved is not None:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
        idx = sorted(acc)
        return KSeedUpdate(msg.round, np.asarray(idx, dtype=np.uint32),
                           np.asarray([acc[i] for i in idx], dtype=np.float32), self.num_samples)

    # -- HeteroFL --------------------------------------------------------------------------------
    def fit_heterofl(self, sub: nn.Module, msg: SubModelTask) -> SubModelUpdate:
        """HeteroFL local training of the width-``msg.rate`` sub-network ``sub`` (built by
        :func:`.heterofl_models.sub_network`: static BatchNorm, scaler).

        Loads ``msg.values`` into ``sub``'s parameters, runs the warm-up section's local SGD
        (``client_lr``, ``momentum``, ``weight_decay``, ``local_epochs``, ``batch_size``; batch
        order from ``derive_seed(run_seed, TAG_SGD, round, cid) >> 1``) with HeteroFL's masked loss
        (logits of classes the client holds no sample of set to zero), and returns the trained
        parameters with the client's class mask (the server averages classifier rows only over
        clients holding the class). The embedded runner and a deployed client both call this."""
        from . import heterofl_models as H
        H.load_params(sub, msg.values)
        k = dict(sub.named_modules())[H.classifier_name(sub)].out_features
        mask = H.label_mask(self.y, k)
        w = self.warmup
        gen = torch.Generator().manual_seed(derive_seed(self.run_seed, TAG_SGD, msg.round, self.cid)
                                            >> 1)
        H.local_train(sub, self.x, self.y, torch.from_numpy(mask), w.client_lr, w.momentum,
                      w.weight_decay, w.local_epochs, w.batch_size, gen)
        return SubModelUpdate(msg.round, H.flat_params(sub), mask, self.num_samples)

    def fit_statistics(self, model: nn.Module, msg: StatsRequest,
                       layout: StateLayout | None = None) -> StatsMessage:
        """Load the global state ``msg.values`` into ``model`` and return the BatchNorm statistics
        of the local data under it (:func:`.bn.local_statistics`, micro-batches of
        ``zo.micro_batch``)."""
        from .bn import local_statistics
        (layout or StateLayout(model)).load(model, msg.values)
        return StatsMessage(msg.round, local_statistics(model, self.x, self.zo.micro_batch),
                            self.num_samples)

    # -- everyone --------------------------------------------------------------------------------
    def apply_broadcast(self, model: nn.Module, msg: BroadcastMessage) -> None:
        """Apply the round's (seed, coeff) list to ``model``'s parameters, exactly as the server."""
        apply_broadcast(model, msg, self.zo.dist, self.zo.backend)


def apply_broadcast(model: nn.Module, msg: BroadcastMessage, dist: str = "rademacher",
                    backend: str | None = None) -> None:
    """``zo_kernels.apply_seeds_(list(model.parameters()), seeds, coeffs)``: the update both the
    server and the clients make after a ZO round (bit-identical on every backend for Rademacher)."""
    if msg.seeds.size == 0:
        return
    with torch.no_grad():
        zo_kernels.apply_seeds_([p.data for p in model.parameters()],
                                torch.from_numpy(msg.seeds.view(np.int64).copy()),
                                torch.from_numpy(msg.coeffs.copy()), 1.0, dist, backend)
