"""Peer optimizers from PyPI, registered in ``OPTIMIZERS`` when their package imports.

They are used as installed, with their documented defaults (the comparison's grid
varies the learning rate around them); nothing of their math is re-implemented here but
``muon-f32``'s, a labelled variant. Only the way they take parameters follows their
documentation:

- ``muon``: ``torch.optim.Muon`` on the hidden weight matrices (2-D weights of Linear
  layers other than the output head; torch's Muon takes 2-D parameters only, so
  convolution kernels go with the rest), ``torch.optim.AdamW`` on embeddings, the head,
  biases, gains and kernels (``adamw_lr``, ``adamw_weight_decay``), chained as one
  optimizer (``training.chain.Chain``). Its Newton-Schulz orthogonalization runs in
  bfloat16 (torch has no option for another dtype), which costs dozens of SGD steps on
  a CPU without a fast bfloat16 matmul (``gramopt.compare.hardware``).
- ``muon-f32``: the same, with ``training.muon_float32.Float32Muon`` in place of
  ``torch.optim.Muon``: torch's update with the orthogonalization in float32. gramopt's
  variant, for CPUs without a fast bfloat16 matmul; its own row, never a silent stand-in
  for ``muon``.
- ``muon-po``: pytorch-optimizer's Muon (the previous ``muon``). Its Newton-Schulz runs
  in bfloat16 too. Its docs put embeddings, the output layer, biases and gains in an
  AdamW group.
- ``ikfac``, ``singd``: singd's SINGD (Lin et al., "Structured Inverse-Free Natural
  Gradient Descent: Memory-Efficient & Numerically-Stable KFAC", ICML 2024,
  arXiv:2312.05705) with ``kfac_like=True`` (IKFAC, Lin et al., "Simplifying
  Momentum-based Positive-definite Submanifold Optimization with Applications to Deep
  Learning", ICML 2023, arXiv:2302.09738) or its default dense structures. singd
  preconditions Linear and Conv2d layers only; the other parameters (embeddings, norm
  gains) follow torch SGD with the same lr, momentum and weight decay (chained), so no
  parameter with a gradient is left alone. Their preconditioner update interval ``T``
  is 5 (package default 10: few updates within the few hundred steps of a comparison
  run); IKFAC's ``lr_cov`` is 0.05, SINGD's the package's 0.01 (at 0.05, SINGD's
  Riemannian momentum blew up after ~8 epochs on digits: loss 1e19).
- ``soap``, ``shampoo``: pytorch-optimizer's SOAP and Shampoo. ``shampoo`` is its
  ``ScalableShampoo``, the form its documentation recommends for training (Anil et al.,
  "Scalable Second Order Optimization for Deep Learning", arXiv:2002.09018): layer-wise
  grafting of the SGD step norm (so its lr is on SGD's scale), inverse roots recomputed
  every ``preconditioning_compute_steps`` = 20 steps from step ``start_preconditioning_step``
  = 10 (package defaults 1000 and 25 would never precondition in a short run), epsilon
  ``matrix_eps`` = 1e-6 (the package's). The plain ``Shampoo`` class used before
  recomputed an SVD per dimension every step, without grafting (many times an SGD step).
- ``psgd-kron``: heavyball's PSGDKron (Kronecker-factored PSGD). heavyball compiles its
  update with ``torch.compile`` by default, which costs a long compilation per optimizer
  on a CPU (counted in the clock of a short run); the comparison runs it eagerly
  (``heavyball.utils.compile_mode = None``, heavyball's switch).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gramopt.training.chain import Chain
from gramopt.training.muon_float32 import Float32Muon
from gramopt.training.registry import MISSING_PEERS, OPTIMIZERS, OptimizerSpec


def _hidden_matrix_ids(model: nn.Module) -> set[int]:
    """Weights of ndim == 2 in hidden Linear layers: not embeddings, not the last Linear
    layer (the output head), not biases or gains."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = {id(p) for m in linears[-1:] for p in m.parameters()}
    return {id(m.weight) for m in linears if m.weight.requires_grad and id(m.weight) not in head}


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
    from pytorch_optimizer import ScalableShampoo

    return ScalableShampoo(model.parameters(), **hyper)


def _muon_po(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    from pytorch_optimizer import Muon

    return Muon(muon_groups(model), **hyper)


def _muon(muon: type[torch.optim.Muon]) -> Callable[[nn.Module, str, dict[str, Any]], torch.optim.Optimizer]:
    """``muon`` (torch.optim.Muon or its float32 variant) on the hidden weight matrices
    (it takes 2-D parameters only), torch.optim.AdamW (``adamw_lr``,
    ``adamw_weight_decay``) on everything else."""

    def build(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
        hyper = dict(hyper)
        adamw = dict(lr=hyper.pop("adamw_lr"), weight_decay=hyper.pop("adamw_weight_decay"))
        hidden_ids = _hidden_matrix_ids(model)
        params = [p for p in model.parameters() if p.requires_grad]
        hidden = [p for p in params if id(p) in hidden_ids]
        rest = [p for p in params if id(p) not in hidden_ids]
        optimizers: list[torch.optim.Optimizer] = []
        if hidden:
            optimizers.append(muon(hidden, **hyper))
        if rest:
            optimizers.append(torch.optim.AdamW(rest, **adamw))
        return Chain(*optimizers)

    return build


def _singd(kfac_like: bool) -> Callable[[nn.Module, str, dict[str, Any]], torch.optim.Optimizer]:
    """singd's SINGD on the Linear and Conv2d layers (the layers it supports); the other
    parameters (embeddings, norm gains) by torch SGD with the same learning rate,
    momentum and weight decay, as singd's documentation advises for unsupported layers.
    ``kfac_like=True`` is IKFAC (Lin et al., ICML 2023), SINGD's K-FAC-like update."""

    def build(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
        from singd.optim.optimizer import SINGD

        supported = [m for m in model.modules() if isinstance(m, SINGD.SUPPORTED_MODULES)]
        covered = {id(p) for m in supported for p in m.parameters() if p.requires_grad}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
        params = [p for m in supported for p in m.parameters() if p.requires_grad]
        optimizers: list[torch.optim.Optimizer] = [
            # IKFAC has no Riemannian momentum (singd sets alpha1 to 0 for kfac_like, with a warning)
            SINGD(
                model, params=params, kfac_like=kfac_like, warn_unsupported=False,
                **({"alpha1": 0.0} if kfac_like else {}), **hyper,
            )
        ]
        if rest:
            sgd = {k: hyper[k] for k in ("lr", "momentum", "weight_decay") if k in hyper}
            optimizers.append(torch.optim.SGD(rest, **sgd))
        return optimizers[0] if len(optimizers) == 1 else Chain(*optimizers)

    return build


def _psgd_kron(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None
    return heavyball.PSGDKron(model.parameters(), **hyper)


MUON_DEFAULTS = dict(lr=2e-2, momentum=0.95, weight_decay=0.0, adamw_lr=3e-3, adamw_weight_decay=0.0)

# Learning rates are the packages' own defaults (pytorch-optimizer 4.1.0, heavyball 3.2.1,
# singd 0.0.5) or, where a package has none that fits, the one its authors recommend.
PEERS: tuple[tuple[str, OptimizerSpec], ...] = (
    ("torch", OptimizerSpec(
        "muon", "torch.optim.Muon on hidden weight matrices + AdamW for the rest (bfloat16 Newton-Schulz)",
        _muon(torch.optim.Muon), dict(MUON_DEFAULTS), source="torch",
    )),
    ("torch", OptimizerSpec(
        "muon-f32", "torch.optim.Muon's update with float32 Newton-Schulz (gramopt's variant) + AdamW for the rest",
        _muon(Float32Muon), dict(MUON_DEFAULTS), source="gramopt variant of torch", tuned_as="muon",
    )),
    ("singd", OptimizerSpec(
        "ikfac", "IKFAC, inverse-free K-FAC (singd, kfac_like=True) + SGD for unsupported layers", _singd(True),
        dict(lr=0.05, momentum=0.9, damping=1e-3, weight_decay=0.0, T=5, lr_cov=0.05), source="singd",
    )),
    ("singd", OptimizerSpec(
        "singd", "SINGD, dense structures (singd's default) + SGD for unsupported layers", _singd(False),
        dict(lr=0.05, momentum=0.9, damping=1e-3, weight_decay=0.0, T=5, lr_cov=0.01), source="singd",
    )),
    ("pytorch_optimizer", OptimizerSpec(
        "soap", "SOAP (pytorch-optimizer)", _soap, dict(lr=3e-3, eps=1e-8), source="pytorch-optimizer",
    )),
    ("pytorch_optimizer", OptimizerSpec(
        "shampoo", "Shampoo with SGD grafting (pytorch-optimizer ScalableShampoo)", _shampoo,
        dict(lr=0.1, preconditioning_compute_steps=20, start_preconditioning_step=10, matrix_eps=1e-6),
        source="pytorch-optimizer",
    )),
    ("pytorch_optimizer", OptimizerSpec(
        "muon-po", "Muon + AdamW for the rest (pytorch-optimizer; bfloat16 Newton-Schulz)", _muon_po,
        dict(lr=2e-2, momentum=0.95, adamw_lr=3e-4), source="pytorch-optimizer",
    )),
    ("heavyball", OptimizerSpec(
        "psgd-kron", "PSGD-Kron (heavyball, eager)", _psgd_kron, dict(lr=1e-3, weight_decay=0.0), source="heavyball",
    )),
)

# Peers whose package is missing, by name: the extra of gramopt that installs them.
EXTRA_OF: dict[str, str] = {spec.name: ("bench" if package == "heavyball" else "compare") for package, spec in PEERS}


def register_peers() -> list[str]:
    """Add every peer whose package is installed; returns the names added."""
    added = []
    for package, spec in PEERS:
        if package == "torch" or importlib.util.find_spec(package) is not None:
            OPTIMIZERS.setdefault(spec.name, spec)
            added.append(spec.name)
        else:
            extra = EXTRA_OF[spec.name]
            MISSING_PEERS[spec.name] = (
                f"it comes from the package {package.replace('_', '-')}, not installed; "
                f"install it with `pip install 'gramopt[{extra}]'` (or `pip install {package.replace('_', '-')}`)"
            )
    return added


register_peers()
