"""Adapters for training frameworks, each importing its framework only when imported.

- :mod:`gramopt.integrations.huggingface`: ``GramoptTrainer``, a ``transformers.Trainer``
  whose training step is the optimizer's own ``opt.backward(logits, labels)``, which GGN
  needs (its Gauss-Newton system takes outputs and targets, not a loss).

PyTorch Lightning needs no adapter: ``configure_optimizers`` returns ``gramopt.SENG`` or
``gramopt.FNGD`` under automatic optimization, and GGN runs under manual optimization
with ``self.optimizers().optimizer.backward(output, target)`` (see the documentation's
integrations guide). SENG and FNGD also run in the plain ``transformers.Trainer``.
"""
