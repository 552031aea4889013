"""``ZOTrainer``: ``transformers.Trainer`` with ZOOptimizer steps (forward passes only).

What changes against ``Trainer`` (everything else -- datasets, collators, LR schedulers, logging,
evaluation, callbacks, checkpoints, ``resume_from_checkpoint`` -- is ``Trainer``'s own code):

- :meth:`ZOTrainer.create_optimizer` builds a :class:`zowarmup.ZOOptimizer` over the *trainable*
  parameters only (``requires_grad=True``: with PEFT/LoRA the adapters; frozen weights are never
  written), in two param groups as ``Trainer`` does (weight decay on the parameters
  ``get_decay_parameter_names`` picks, none on biases and norms).
- :meth:`ZOTrainer.training_step` never calls ``backward``: it keeps the micro-batches of the
  current optimizer step and, on the last one (``gradient_accumulation_steps`` of them, fewer at
  the end of an epoch), runs one ZO step whose closure evaluates **every** micro-batch at the same
  perturbation and sums their losses (each scaled as ``Trainer`` scales them: divided by the
  number of micro-batches, or token-summed over ``num_items_in_batch`` for models that accept
  it). So ``gradient_accumulation_steps=k`` equals a k-times-larger batch, and memory stays that
  of one micro-batch's forward. The step's loss (mean of its 2S evaluations) is returned on that
  micro-batch and 0 on the others, so the logged ``loss`` is the step's loss.
- The random state (dropout) is the same in each of the 2S evaluations of a step: the closure
  restores torch's generator state at every call.
- ``Trainer``'s own ``optimizer.step()`` call after the accumulation is a no-op (the step already
  happened); the LR scheduler then steps as usual and the next ZO step reads the new ``lr``.
- The optimizer's state is its step counter and seed (``ZOOptimizer.state_dict()``: no moments,
  no gradient buffers); ``Trainer`` saves it in ``optimizer.pt`` with the weights, scheduler and
  RNG states, and a resumed run continues bit-identically.

Not supported (each raises a one-line error when requested): ``fp16=True`` (a GradScaler needs
gradients; ``bf16=True`` autocast, or bf16/fp16 weights, work), ``max_grad_norm > 0`` (there is no
gradient to clip), DeepSpeed and FSDP (they own the parameters and the optimizer), and more than
one process (use ``ZOOptimizer(process_group=...)`` in a plain loop for data-parallel ZO).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..optim import ZOOptimizer

__all__ = ["ZOTrainer", "ZOTrainingArguments"]

_U64 = 1 << 64


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the ZO step's settings (see ``ZOOptimizer``).

    ``learning_rate``, ``weight_decay``, ``lr_scheduler_type``, ``warmup_*``, logging, evaluation
    and saving arguments mean what they mean for ``Trainer``. The ZO step moves the weights by
    ``-learning_rate * zo_scale * g_s * z_s / S`` per direction (``g_s`` the projected gradient),
    ``-learning_rate * zo_scale**2 * grad`` in expectation; weight decay is decoupled
    (``w *= 1 - learning_rate * weight_decay``).
    """

    zo_eps: float = field(default=1e-3, metadata={
        "help": "ZO finite-difference step eps (> 0); the perturbation is eps * zo_scale * z."})
    zo_num_samples: int = field(default=1, metadata={
        "help": "S, perturbation directions per optimizer step (2S forwards per micro-batch)."})
    zo_scale: float = field(default=1.0, metadata={
        "help": "Noise magnitude c (> 0); 1.0 is MeZO's convention (update -lr*grad in "
                "expectation), ZOOptimizer's own default is 0.75."})
    zo_dist: str = field(default="rademacher", metadata={
        "help": "Noise distribution: 'rademacher' (default) or 'gaussian'."})
    zo_exact: bool = field(default=False, metadata={
        "help": "Exact mode: perturbed forwards read W + eps*c*z made on the fly; the stored "
                "weights change only by the update (no bf16/fp16 drift)."})
    zo_seed: Optional[int] = field(default=None, metadata={
        "help": "Base seed of the ZO directions, in [0, 2**64); default: the run's seed."})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "Must stay 0: ZO training has no gradient to clip."})

    def __post_init__(self):
        _check_zo_args(self)
        super().__post_init__()
        if getattr(self, "deepspeed", None):
            raise ValueError("ZOTrainingArguments: deepspeed is not supported (it owns the "
                             "optimizer and the parameters); ZO needs neither gradients nor "
                             "optimizer state to shard")
        if getattr(self, "fsdp", None):
            raise ValueError("ZOTrainingArguments: fsdp is not supported (sharded parameters); "
                             "use ZOOptimizer directly")


def _check_zo_args(a) -> None:
    """One-line ValueError naming the first invalid ZO argument."""
    def real(name, positive):
        v = getattr(a, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                or (positive and not v > 0):
            raise ValueError(f"ZOTrainingArguments: {name} = {v!r}; must be a finite number"
                             + (" > 0" if positive else ""))
    real("zo_eps", True)
    real("zo_scale", True)
    n = a.zo_num_samples
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"ZOTrainingArguments: zo_num_samples = {n!r}; must be an int >= 1")
    if a.zo_dist not in ("rademacher", "gaussian"):
        raise ValueError(f"ZOTrainingArguments: zo_dist = {a.zo_dist!r}; expected 'rademacher' "
                         "or 'gaussian'")
    if not isinstance(a.zo_exact, bool):
        raise ValueError(f"ZOTrainingArguments: zo_exact = {a.zo_exact!r}; must be True or False")
    s = a.zo_seed
    if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Integral)
                          or not 0 <= s < _U64):
        raise ValueError(f"ZOTrainingArguments: zo_seed = {s!r}; must be None or an int in "
                         "[0, 2**64)")
    if a.max_grad_norm is not None and a.max_grad_norm != 0:
        raise ValueError(f"ZOTrainingArguments: max_grad_norm = {a.max_grad_norm!r}; ZO training "
                         "has no gradient to clip, leave it at 0")
    if getattr(a, "fp16", False):
        raise ValueError("ZOTrainingArguments: fp16=True (mixed precision with a gradient scaler) "
                         "is not supported; use bf16=True, or load the model in float16/bfloat16 "
                         "(zo_exact=True keeps such weights from drifting)")


class _TrainerZOOptimizer(ZOOptimizer):
    """The ZOOptimizer ``Trainer`` holds: ``step()`` without a closure is ``Trainer``'s own call
    after the accumulation, when :meth:`ZOTrainer.training_step` has already made the step."""

    def step(self, closure=None):  # type: ignore[override]
        if closure is None:
            return None
        return super().step(closure)


class ZOTrainer(Trainer):
    """``transformers.Trainer`` that trains with zeroth-order steps: no backward, no gradients.

    Takes the same arguments as ``Trainer``; ``args`` must be :class:`ZOTrainingArguments` (None:
    defaults with ``output_dir="tmp_trainer"``). ``optimizers=(None, scheduler)`` is accepted; an
    optimizer other than the ZOOptimizer this class builds is not. See the module docstring.
    """

    def __init__(self, model=None, args=None, *pos, **kw):
        if args is None:
            args = ZOTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, ZOTrainingArguments):
            raise TypeError(f"ZOTrainer: args must be ZOTrainingArguments (TrainingArguments plus "
                            f"the zo_* settings), got {type(args).__name__}")
        opts = kw.get("optimizers")
        if opts is not None and opts[0] is not None and not isinstance(opts[0], ZOOptimizer):
            raise TypeError(f"ZOTrainer: optimizers[0] must be None (ZOTrainer builds its "
                            f"ZOOptimizer), got {type(opts[0]).__name__}")
        if args.world_size > 1:
            raise ValueError(f"ZOTrainer runs in one process (world_size = {args.world_size}); "
                             "for data-parallel ZO use ZOOptimizer(process_group=...) in a loop")
        self._zo: ZOOptimizer | None = None
        self._zo_micro: list = []
        super().__init__(model, args, *pos, **kw)
        if opts is not None and isinstance(opts[0], ZOOptimizer):
            self._zo = opts[0]

    # -- optimizer ---------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """A ZOOptimizer over the trainable parameters (decay / no-decay groups as ``Trainer``)."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        a = self.args
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ZOTrainer: the model has no trainable parameters "
                             "(requires_grad=True)")
        decay = set(self.get_decay_parameter_names(model))
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": a.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        seed = a.seed if a.zo_seed is None else a.zo_seed
        kwargs = dict(lr=a.learning_rate, eps=a.zo_eps, num_samples=a.zo_num_samples,
                      dist=a.zo_dist, scale=a.zo_scale, seed=seed)
        if a.zo_exact:
            kwargs["exact"] = True
        self.optimizer = _TrainerZOOptimizer(groups, **kwargs)
        self._zo = self.optimizer
        return self.optimizer

    @property
    def zo_optimizer(self) -> ZOOptimizer:
        """The ZOOptimizer (``self.optimizer`` may be accelerate's wrapper around it)."""
        if self._zo is None:
            raise RuntimeError("ZOTrainer: the optimizer is created by train() "
                               "(or create_optimizer())")
        return self._zo

    # -- the step ----------------------------------------------------------------------------------
    def _is_last_micro_batch(self) -> bool:
        """True on the last micro-batch of an optimizer step (``Trainer`` sets accelerate's
        ``sync_gradients`` flag exactly there, the end of an epoch included)."""
        return bool(self.accelerator.sync_gradients)

    def _scales_by_micro_batches(self, num_items_in_batch) -> bool:
        """Whether ``Trainer`` divides each micro-batch's loss by their number (else the model or
        ``compute_loss_func`` sums over tokens and divides by ``num_items_in_batch``): the same
        rule as ``Trainer.training_step``."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False)
                      and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        return not scaled

    def _get_grad_norm(self, model, grad_norm=None):
        """No gradient exists: nothing to report (``Trainer`` would log a norm of 0)."""
        return None

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch=None) -> torch.Tensor:
        """Keep the micro-batch; on the step's last one, run the ZO step (see the module doc)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._zo_micro.append(inputs)
        if not self._is_last_micro_batch():
            return torch.zeros((), device=self.args.device)
        micro, self._zo_micro = self._zo_micro, []
        divide = self._scales_by_micro_batches(num_items_in_batch)
        k = getattr(self, "current_gradient_accumulation_steps", None) or len(micro)
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

        def closure():
            torch.set_rng_state(cpu_state)  # the same dropout masks in every evaluation
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
            total = None
            for mb in micro:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, mb, num_items_in_batch=num_items_in_batch)
                loss = loss.detach().float()
                if divide:
                    loss = loss / k
                total = loss if total is None else total + loss
            return total

        loss = self.zo_optimizer.step(closure)
        return torch.tensor(loss, device=self.args.device)
