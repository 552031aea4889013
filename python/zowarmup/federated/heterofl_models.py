"""HeteroFL's nested sub-networks (Diao, Ding and Tarokh, ICLR 2021), for the MLP, CNN and
ResNet-18 families of :mod:`zowarmup.models`.

A client of width rate ``p`` trains the model built with every hidden width ``w`` replaced by
``ceil(p * w)`` (input channels and classes unchanged). Its parameters are the *leading* slice of
the global model's along every dimension whose size differs: ``W_p = W[:ceil(p*out), :ceil(p*in),
...]``. Flattening in these models is channel-major, so the classifier of the CNN (input ``C * 2 *
2``) and of the others takes the leading block too; sub-networks of smaller rates are nested in
those of larger ones.

Also here, as HeteroFL defines them:

- the **scaler**: every hidden Linear/Conv2d output is divided by ``p`` in training (identity at
  evaluation and at ``p = 1``), so the sub-network's activations match the full network's scale;
- **static BatchNorm** (sBN): during local training BatchNorm layers normalize with the batch's
  statistics and track nothing; the global model's running statistics are set afterwards from the
  clients' statistics under the full model (:func:`zowarmup.federated.bn.local_statistics`);
- the **masked loss**: a client's logits of classes it holds no sample of are set to zero before
  the cross-entropy, and only clients holding class k update the classifier's row k
  (:func:`aggregate`).

Aggregation: every entry of every parameter is the plain average over the clients that hold it
(and, for classifier rows, hold the class); an entry no client holds keeps its value.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import models as zmodels

__all__ = ["sub_options", "build_sub_model", "sub_network", "sub_param_count", "sub_index",
           "extract", "classifier_name", "add_scaler", "static_bn", "local_train", "aggregate",
           "flat_params", "load_params", "unflatten", "label_mask"]


def _scaled(w: int, rate: float) -> int:
    return max(1, int(math.ceil(rate * w - 1e-9)))


def sub_options(name: str, options: dict, rate: float) -> dict:
    """``model.options`` of the width-``rate`` sub-network of ``name`` (mlp, cnn, resnet18)."""
    o = dict(options)
    if name == "mlp":
        o["hidden"] = [_scaled(h, rate) for h in o.get("hidden", (128,))]
    elif name == "cnn":
        o["widths"] = [_scaled(w, rate) for w in o.get("widths", (16, 32, 64))]
    elif name == "resnet18":
        o["width"] = _scaled(o.get("width", 64), rate)
    else:
        raise ValueError(f"HeteroFL supports the mlp, cnn and resnet18 families, not {name!r}")
    return o


def build_sub_model(cfg, ds, rate: float) -> nn.Module:
    """The width-``rate`` sub-network for the run's model (same norm; weights to be loaded)."""
    norm = cfg.model.norm
    return zmodels.build_model(cfg.model.name, ds.num_classes, ds.in_channels, ds.image_size,
                               norm=norm, **sub_options(cfg.model.name, cfg.model.options, rate))


def sub_network(cfg, ds, rate: float, device) -> nn.Module:
    """The width-``rate`` sub-network a client trains, as both the embedded runner and a deployed
    client build it: :func:`build_sub_model` (torch's RNG state left as it was: the weights are
    always loaded from the server), :func:`static_bn`, :func:`add_scaler`."""
    rng = torch.get_rng_state()
    try:
        sub = build_sub_model(cfg, ds, rate).to(device)
    finally:
        torch.set_rng_state(rng)
    static_bn(sub)
    add_scaler(sub, rate)
    return sub


def sub_param_count(cfg, ds, rate: float) -> int:
    """Parameters of the width-``rate`` sub-network (sized on the meta device: no memory, no
    RNG)."""
    with torch.device("meta"):
        sub = build_sub_model(cfg, ds, rate)
    return int(sum(p.numel() for p in sub.parameters()))


def flat_params(model: nn.Module) -> np.ndarray:
    """The model's parameters (``parameters()`` order) as one float32 vector: what a SUBMODEL
    task and its reply carry."""
    return np.concatenate([p.detach().reshape(-1).cpu().numpy()
                           for p in model.parameters()]).astype(np.float32)


def load_params(model: nn.Module, flat: np.ndarray) -> None:
    """Inverse of :func:`flat_params` (in place)."""
    off = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(torch.from_numpy(flat[off:off + n]).reshape(p.shape).to(p))
            off += n


def unflatten(model: nn.Module, flat: np.ndarray, device) -> dict:
    """Parameter name -> tensor of ``flat`` in ``model``'s (a sub-network's) layout."""
    out, off = {}, 0
    for n, p in model.named_parameters():
        out[n] = torch.from_numpy(flat[off:off + p.numel()].copy()).reshape(p.shape).to(device)
        off += p.numel()
    return out


def label_mask(y: torch.Tensor, num_classes: int) -> np.ndarray:
    """bool (num_classes,): the classes present in the labels ``y`` (the masked loss)."""
    m = np.zeros(num_classes, dtype=bool)
    m[np.unique(y.cpu().numpy())] = True
    return m


def classifier_name(model: nn.Module) -> str:
    """Name prefix of the model's last Linear layer (the classifier whose rows are classes)."""
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    return last


def sub_index(full: nn.Module, sub: nn.Module) -> dict[str, tuple]:
    """Parameter name -> tuple of leading slices mapping the sub-network's parameter into the
    global one (``full_param[idx]`` has the sub-parameter's shape)."""
    fp = dict(full.named_parameters())
    out = {}
    for n, p in sub.named_parameters():
        q = fp[n]
        if p.dim() != q.dim() or any(a > b for a, b in zip(p.shape, q.shape)):
            raise ValueError(f"sub-network parameter {n} {tuple(p.shape)} does not nest in "
                             f"{tuple(q.shape)}")
        out[n] = tuple(slice(0, a) for a in p.shape)
    return out


@torch.no_grad()
def extract(full: nn.Module, sub: nn.Module, index: dict) -> None:
    """Load the global model's leading slices into ``sub``'s parameters."""
    fp = dict(full.named_parameters())
    for n, p in sub.named_parameters():
        p.copy_(fp[n][index[n]])


def add_scaler(model: nn.Module, rate: float) -> list:
    """HeteroFL's scaler: divide every hidden Linear/Conv2d output by ``rate`` in training mode
    (forward hooks; the classifier is not scaled). Returns the hook handles."""
    cls = classifier_name(model)
    hooks = []
    if rate == 1.0:
        return hooks
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n != cls:
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out: out / rate if mod.training else out))
    return hooks


def static_bn(model: nn.Module) -> None:
    """sBN for local training: BatchNorm layers use batch statistics and track nothing."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_mask: torch.Tensor,
                lr: float, momentum: float, weight_decay: float, epochs: int, batch_size: int,
                generator: torch.Generator) -> None:
    """Local SGD with the masked loss (logits of classes outside ``label_mask`` set to zero)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.train()
    n = x.shape[0]
    keep = label_mask.to(x.device)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(x.device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if bn and idx.numel() < 2:
                continue
            opt.zero_grad(set_to_none=True)
            out = model(x[idx]).masked_fill(~keep, 0.0)
            F.cross_entropy(out, y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def aggregate(full: nn.Module, updates: list[tuple[dict, dict, np.ndarray]], num_classes: int
              ) -> None:
    """HeteroFL's per-entry average, in place on ``full``'s parameters.

    Args:
        updates: per kept client ``(index, params, label_mask)``: ``index`` from :func:`sub_index`,
            ``params`` name -> tensor (the client's trained sub-network parameters),
            ``label_mask`` bool (num_classes,) of the classes it holds.

    Every entry becomes the mean over the clients whose slice covers it (for the classifier's
    weight rows and bias entries: and whose label mask holds the row's class); entries covered by
    no client keep their value.
    """
    cls = classifier_name(full)
    for n, p in full.named_parameters():
        acc = torch.zeros_like(p, dtype=torch.float64)
        cnt = torch.zeros_like(p, dtype=torch.float64)
        for index, params, mask in updates:
            if n not in params:
                continue
            idx = index[n]
            one = torch.ones(params[n].shape, dtype=torch.float64, device=p.device)
            if n.startswith(cls + ".") and num_classes == p.shape[0]:
                rows = torch.as_tensor(mask, device=p.device).to(torch.float64)
                one = one * rows.view(-1, *([1] * (one.dim() - 1)))
            acc[idx] += one * params[n].to(torch.float64)
            cnt[idx] += one
        held = cnt > 0
        p[held] = (acc[held] / cnt[held]).to(p.dtype)
