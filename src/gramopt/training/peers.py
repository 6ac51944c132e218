"""Peer optimizers from PyPI, registered in ``OPTIMIZERS`` when their package imports.

They are used as installed, with their documented defaults (the comparison's grid
varies the learning rate around them); nothing of their math is re-implemented here.
Only the way they take parameters follows their documentation:

- ``soap``, ``shampoo``, ``muon``: pytorch-optimizer's SOAP, Shampoo and Muon. Muon
  orthogonalizes the updates of hidden weight matrices only; its docs put embeddings,
  the output layer, biases and gains in an AdamW group (``use_muon=False``).
- ``psgd-kron``: heavyball's PSGDKron (Kronecker-factored PSGD). heavyball compiles its
  update with ``torch.compile`` by default, which costs 10-170 s per optimizer on a CPU
  (counted in the clock of a short run); the comparison runs it eagerly
  (``heavyball.utils.compile_mode = None``, heavyball's switch).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from gramopt.training.registry import OPTIMIZERS, OptimizerSpec


def muon_groups(model: nn.Module) -> list[dict[str, Any]]:
    """pytorch-optimizer's Muon parameter groups: weights of ndim >= 2 in hidden layers
    get Muon; embeddings, the last Linear layer (the output head), biases and gains get
    its AdamW group."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    adamw_modules = [m for m in model.modules() if isinstance(m, nn.Embedding)] + linears[-1:]
    adamw_ids = {id(p) for m in adamw_modules for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.ndim >= 2 and id(p) not in adamw_ids]
    rest = [p for p in params if p.ndim < 2 or id(p) in adamw_ids]
    groups = [dict(params=rest, use_muon=False)]
    if hidden:
        groups.insert(0, dict(params=hidden, use_muon=True))
    return groups


def _soap(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(model.parameters(), **hyper)


def _shampoo(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    from pytorch_optimizer import Shampoo

    return Shampoo(model.parameters(), **hyper)


def _muon(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    from pytorch_optimizer import Muon

    return Muon(muon_groups(model), **hyper)


def _psgd_kron(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None
    return heavyball.PSGDKron(model.parameters(), **hyper)


# Learning rates are the packages' own defaults (pytorch-optimizer 4.1.0, heavyball 3.2.1).
PEERS: tuple[tuple[str, OptimizerSpec], ...] = (
    ("pytorch_optimizer", OptimizerSpec("soap", "SOAP (pytorch-optimizer)", _soap, dict(lr=3e-3), source="pytorch-optimizer")),
    ("pytorch_optimizer", OptimizerSpec("shampoo", "Shampoo (pytorch-optimizer)", _shampoo, dict(lr=1e-3), source="pytorch-optimizer")),
    (
        "pytorch_optimizer",
        OptimizerSpec(
            "muon", "Muon + AdamW for the rest (pytorch-optimizer)", _muon, dict(lr=2e-2, adamw_lr=3e-4), source="pytorch-optimizer"
        ),
    ),
    ("heavyball", OptimizerSpec("psgd-kron", "PSGD-Kron (heavyball, eager)", _psgd_kron, dict(lr=1e-3), source="heavyball")),
)


def register_peers() -> list[str]:
    """Add every peer whose package is installed; returns the names added."""
    added = []
    for package, spec in PEERS:
        if importlib.util.find_spec(package) is not None:
            OPTIMIZERS.setdefault(spec.name, spec)
            added.append(spec.name)
    return added


register_peers()
