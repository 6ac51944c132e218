"""Hugging Face ``transformers.Trainer`` with the optimizer's own backward pass.

The plain ``Trainer`` computes ``model(**inputs).loss`` and calls ``loss.backward()``,
which is all SENG and FNGD need. GGN instead needs the model's outputs and the targets
(``opt.backward(logits, labels)`` runs one backward pass per output dimension to build
its Gauss-Newton system), so :class:`GramoptTrainer` replaces the training step::

    opt = gramopt.GGN(model, lr=0.3, damping=1.0, loss="cross_entropy")
    trainer = GramoptTrainer(model=model, args=TrainingArguments(...),
                             train_dataset=data, optimizers=(opt, None))
    trainer.train()

It works with SENG and FNGD too (their uniform loop, which skips the weight gradients
FNGD does not read). ``gradient_accumulation_steps`` and ``max_grad_norm`` keep their
meaning (see :class:`GramoptTrainer`). Importing this module imports ``transformers``.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer

import gramopt

GRAMOPT_OPTIMIZERS = (gramopt.GGN, gramopt.SENG, gramopt.FNGD)

logger = logging.getLogger(__name__)


class GramoptTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is ``loss = opt.backward(logits, labels)``.

    Pass the gramopt optimizer, built on the same model, as ``optimizers=(opt, scheduler)``
    (``scheduler`` None: the Trainer makes its ``lr_scheduler_type`` schedule over it). The
    model's output must have ``.logits`` (``[b, k]``, ``[b, C, ...]`` with the classes in
    dimension 1, or a tensor as first element) and every batch a ``"labels"`` entry (the
    targets of the optimizer's ``loss``); the other entries are the model's keyword arguments.

    ``gradient_accumulation_steps`` G > 1: each micro-batch's ``opt.backward`` adds to the
    step, and the Trainer's one ``step()`` after G of them is the step of the concatenated
    batch (the optimizers weigh micro-batches of any sizes exactly; the Trainer's division of
    the loss by G is not needed and not done). The logged loss is the mean of the micro-batch
    losses.

    GGN's ``damping_adaptation`` re-runs the model on the step's input (its recorded
    keyword arguments) and takes the logits from the new ``ModelOutput`` as the step did
    (``.logits``, else the first element), so it works as in a plain loop. An accumulated
    step has several inputs: there the damping stays fixed and GGN warns once (pass
    ``damping_adaptation=None`` to GGN to train with a fixed damping and no warning).

    ``max_grad_norm`` c > 0 (the Trainer's default is 1.0) becomes the optimizer's
    ``max_update_norm``: the step's direction (all parameters together, before learning
    rate and momentum) is scaled by ``min(1, c / ||d||)``, as ``clip_grad_norm_`` scales
    the gradient of SGD. The Trainer's own clipping of ``.grad`` is turned off (the trainer
    keeps a copy of ``args`` with ``max_grad_norm=0``; the caller's ``args`` is unchanged),
    because GGN's and FNGD's steps do not read ``.grad``. If the optimizer already has a
    different ``max_update_norm``, construction raises ValueError; set ``max_grad_norm=0``
    to clip only with the optimizer's own ``max_update_norm``, or not at all.

    The logged ``grad_norm`` is the norm of the gradient of the step's mean loss with SENG
    (its ``.grad``); GGN and FNGD do not fill ``.grad`` of the layers they precondition, so
    no ``grad_norm`` is logged for them rather than the norm of a partial gradient.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.optimizer, GRAMOPT_OPTIMIZERS):
            raise TypeError(
                "GramoptTrainer needs a gramopt optimizer (GGN, SENG or FNGD) built on the model, "
                f"passed as optimizers=(opt, scheduler); got {type(self.optimizer).__name__}"
            )
        self.gramopt_optimizer = self.optimizer
        self._clip_with_optimizer(self.args.max_grad_norm)

    def _clip_with_optimizer(self, max_grad_norm: float | None) -> None:
        """Move ``max_grad_norm`` > 0 to the optimizer's ``max_update_norm`` and turn the
        Trainer's clipping of ``.grad`` off (on a copy of ``self.args``)."""
        if not max_grad_norm or max_grad_norm <= 0:
            return
        if not math.isfinite(max_grad_norm):
            raise ValueError(f"GramoptTrainer: max_grad_norm must be finite (or 0: no clipping), got {max_grad_norm}")
        opt = self.gramopt_optimizer
        current = opt.max_update_norm
        if current is not None and current != float(max_grad_norm):
            raise ValueError(
                f"GramoptTrainer: max_grad_norm={max_grad_norm} in TrainingArguments would become the optimizer's "
                f"max_update_norm, but {type(opt).__name__} already has max_update_norm={current}; set "
                "max_grad_norm=0 to keep the optimizer's, or give both the same value"
            )
        opt.max_update_norm = float(max_grad_norm)
        logger.info(
            "GramoptTrainer: max_grad_norm=%s clips the update (%s max_update_norm), not .grad",
            max_grad_norm, type(opt).__name__,
        )
        self.args = copy.copy(self.args)
        self.args.max_grad_norm = 0.0

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """What the Trainer logs as ``grad_norm`` (transformers >= 5 computes it from
        ``.grad`` before each step): the norm of ``.grad`` where it holds the gradient of the
        step's mean loss, i.e. for SENG, whose step reads it; None, so that no ``grad_norm``
        is logged, for GGN and FNGD, whose ``opt.backward`` leaves ``.grad`` of the
        preconditioned layers unset (their step reads the per-sample captures): the norm of
        ``.grad`` would cover the other parameters only (0 for GGN after its first step)."""
        if self.gramopt_optimizer.needs.reads_gradients != "all":
            return None
        return super()._get_grad_norm(model, grad_norm)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One forward pass, then the optimizer's ``backward(logits, labels)`` (which also
        accumulates micro-batches); returns the micro-batch's mean loss (detached) divided by
        the number of micro-batches of this step, which the Trainer sums and logs. The Trainer
        calls ``step()`` after the last micro-batch."""
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        if "labels" not in inputs:
            raise ValueError(f"GramoptTrainer: a batch without 'labels' (it has {sorted(inputs)})")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        loss = self.gramopt_optimizer.backward(logits, labels).detach()
        micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return loss / max(int(micro_batches), 1)
