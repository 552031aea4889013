"""Zeroth-order training with the Hugging Face ``transformers.Trainer``: swap ``Trainer`` for
:class:`ZOTrainer` and ``TrainingArguments`` for :class:`ZOTrainingArguments`.

Needs the ``[hf]`` extra (``pip install --no-build-isolation -e ".[hf]"``: transformers, and peft for
LoRA)::

    from transformers import AutoModelForCausalLM
    from zowarmup.hf import ZOTrainer, ZOTrainingArguments

    model = AutoModelForCausalLM.from_pretrained(local_dir)         # a checkpoint you already have
    args = ZOTrainingArguments(output_dir="out", learning_rate=1e-6, zo_eps=1e-3,
                               zo_num_samples=1, per_device_train_batch_size=8,
                               gradient_accumulation_steps=4, lr_scheduler_type="cosine",
                               save_steps=500, eval_strategy="steps", eval_steps=500)
    ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=val).train()

See :class:`ZOTrainer` for what a step does.
"""
from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("zowarmup.hf needs the 'transformers' package: pip install "
                      "--no-build-isolation -e \".[hf]\" (or pip install transformers)") from exc

from .trainer import ZOTrainer, ZOTrainingArguments

__all__ = ["ZOTrainer", "ZOTrainingArguments"]
