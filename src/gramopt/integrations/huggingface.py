"""Hugging Face ``transformers.Trainer`` with the optimizer's own backward pass.

The plain ``Trainer`` computes ``model(**inputs).loss`` and calls ``loss.backward()``,
which is all SENG and FNGD need. GGN instead needs the model's outputs and the targets
(``opt.backward(logits, labels)`` runs one backward pass per output dimension to build
its Gauss-Newton system), so :class:`GramoptTrainer` replaces the training step::

    opt = gramopt.GGN(model, lr=0.3, damping=1.0, loss="cross_entropy")
    trainer = GramoptTrainer(model=model, args=TrainingArguments(..., max_grad_norm=0),
                             train_dataset=data, optimizers=(opt, None))
    trainer.train()

It works with SENG and FNGD too (their uniform loop, which skips the weight gradients
FNGD does not read). Importing this module imports ``transformers``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

import gramopt

GRAMOPT_OPTIMIZERS = (gramopt.GGN, gramopt.SENG, gramopt.FNGD)


class GramoptTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is ``loss = opt.backward(logits, labels)``.

    Pass the gramopt optimizer, built on the same model, as ``optimizers=(opt, scheduler)``
    (``scheduler`` None: the Trainer makes its ``lr_scheduler_type`` schedule over it). The
    model's output must have ``.logits`` (``[b, k]``, or a tensor as first element) and every
    batch a ``"labels"`` entry (the targets of the optimizer's ``loss``); the other entries
    are the model's keyword arguments.

    Refused at construction, because the step would silently differ from what they say:
    ``gradient_accumulation_steps`` other than 1 (each ``opt.backward`` starts a new step's
    captures) and ``max_grad_norm`` > 0 (clipping ``.grad`` does not reach GGN's or FNGD's
    preconditioned directions, which are not computed from ``.grad``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.optimizer, GRAMOPT_OPTIMIZERS):
            raise TypeError(
                "GramoptTrainer needs a gramopt optimizer (GGN, SENG or FNGD) built on the model, "
                f"passed as optimizers=(opt, scheduler); got {type(self.optimizer).__name__}"
            )
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "GramoptTrainer: gradient_accumulation_steps must be 1 (gramopt optimizers take one "
                f"backward pass per step), got {self.args.gradient_accumulation_steps}"
            )
        if self.args.max_grad_norm:
            raise ValueError(
                "GramoptTrainer: set max_grad_norm=0 in TrainingArguments; gradient clipping acts on "
                f".grad, which GGN's and FNGD's steps do not read (got max_grad_norm={self.args.max_grad_norm})"
            )
        self.gramopt_optimizer = self.optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One forward pass, then the optimizer's ``backward(logits, labels)``; returns the
        mean loss (detached), which the Trainer logs. The Trainer then calls ``step()``."""
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        if "labels" not in inputs:
            raise ValueError(f"GramoptTrainer: a batch without 'labels' (it has {sorted(inputs)})")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        return self.gramopt_optimizer.backward(logits, labels).detach()
