"""Every optimizer configuration the contract tests run, as data (in the style of
torch.optim's OptimizerInfo lists): one :class:`OptimizerCase` per method and
configuration, run through the same tests in test_contract.py, test_bad_inputs.py,
test_robustness.py and test_properties.py.

Covered: GGN with each solver (cholesky, cg, sketch-pcg, nystrom-pcg, auto) and both
losses, momentum and weight decay, a Transformer (Embedding, LayerNorm, attention);
SENG exact, sketched (leverage and uniform sampling), with implicit layers (a low
``ImplicitConfig.threshold``, also truncated and sketched on a CNN), ``curvature_every``
> 1 and a damping schedule; FNGD on every step and with coefficient sharing after a few
steps (so that tests cross from estimation into sharing); both training loops; and the
two toy methods of toy_method.py (a method written on the contract is one small file plus
its entries here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gramopt
import models
from gramopt.optim.base import SampleSpaceOptimizer
from toy_method import DiagonalFisher, DiagonalGaussNewton

LOSS_FUNCTIONS = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


@dataclass(frozen=True)
class ModelSpec:
    """A small model and how to draw its inputs: ``build(outputs)``, ``inputs(b, generator)``."""

    build: Callable[[int], nn.Module]
    inputs: Callable[[int, torch.Generator], Tensor]
    float_inputs: bool = True


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(lambda k: models.mlp(out=k), lambda b, g: torch.randn(b, 5, generator=g)),
    # wide enough that sketch-pcg's Kronecker sketch really sketches (m = 4 b < 32)
    "wide": ModelSpec(lambda k: models.mlp(hidden=32, out=k), lambda b, g: torch.randn(b, 5, generator=g)),
    "cnn": ModelSpec(lambda k: models.cnn(out=k), lambda b, g: torch.randn(b, 1, 8, 8, generator=g)),
    "transformer": ModelSpec(
        lambda k: models.TinyTransformer(out=k),
        lambda b, g: torch.randint(0, 11, (b, 5), generator=g),
        float_inputs=False,
    ),
}


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer configuration.

    Attributes:
        id: the test id.
        cls: GGN, SENG or FNGD.
        kwargs: constructor arguments besides the model and ``loss``.
        loss: ``"mse"`` (2 outputs) or ``"cross_entropy"`` (3 classes).
        model: a key of :data:`MODELS`.
        loop: ``"uniform"`` (``opt.backward(model(x), y)``) or ``"ordinary"``
            (``loss_fn(model(x), y).backward()``).
        batch: samples per step.
        permutation_invariant: whether permuting a batch leaves every step unchanged
            (not so for FNGD's sharing phase: its shared coefficients are tied to batch
            positions, Algorithm 1 of Ou et al., arXiv:2403.03473).
        representative: run by the per-method tests of bad inputs.

    What holds for every configuration of a method (its error inputs, its capability
    flags) is data on :data:`METHODS`, reached through the case's properties.
    """

    id: str
    cls: type[SampleSpaceOptimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "mse"
    model: str = "mlp"
    loop: str = "uniform"
    batch: int = 6
    permutation_invariant: bool = True
    representative: bool = False

    @property
    def outputs(self) -> int:
        return 2 if self.loss == "mse" else 3

    @property
    def method(self) -> MethodInfo:
        return METHODS[self.cls]

    @property
    def error_inputs(self) -> list[tuple[dict[str, Any], str]]:
        """Constructor arguments the method refuses with a ValueError matching ``match``."""
        return [({name: value}, match) for name, value, match in COMMON_ERROR_INPUTS] + self.method.error_inputs

    @property
    def float_inputs(self) -> bool:
        return MODELS[self.model].float_inputs

    def build_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return MODELS[self.model].build(self.outputs).to(dtype)

    def make(self, model: nn.Module, **overrides: Any) -> SampleSpaceOptimizer:
        return self.cls(model, **{**self.kwargs, "loss": self.loss, **overrides})

    def data(
        self, generator: torch.Generator, batch: int | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        b = self.batch if batch is None else batch
        x = MODELS[self.model].inputs(b, generator)
        if x.is_floating_point():
            x = x.to(dtype)
        if self.loss == "mse":
            return x, torch.randn(b, self.outputs, generator=generator).to(dtype)
        return x, torch.randint(0, self.outputs, (b,), generator=generator)

    def batches(self, steps: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        return [self.data(generator, dtype=dtype) for _ in range(steps)]

    def step(self, opt: SampleSpaceOptimizer, model: nn.Module, x: Tensor, y: Tensor) -> float:
        """One training step in the case's loop; returns the loss."""
        opt.zero_grad()
        if self.loop == "uniform":
            loss = opt.backward(model(x), y)
        else:
            loss = LOSS_FUNCTIONS[self.loss](model(x), y)
            loss.backward()
        opt.step()
        return float(loss.detach())


GGN, SENG, FNGD = gramopt.GGN, gramopt.SENG, gramopt.FNGD
SketchConfig, ImplicitConfig = gramopt.SketchConfig, gramopt.ImplicitConfig


@dataclass(frozen=True)
class MethodInfo:
    """What every configuration of one method shares (torch's OptimizerInfo style).

    Attributes:
        error_inputs: ``(constructor kwargs, message pattern)`` refused with a ValueError
            beyond :data:`COMMON_ERROR_INPUTS`; model-dependent ones assume the MLP with
            3 outputs (``models.mlp(out=3)``) of the representative cross-entropy cases.
        linear_conv_only: the method preconditions Linear/Conv layers only and gives
            every other parameter the plain gradient (no handler is required).
        loops: the training loops the method supports (``"uniform"``: ``opt.backward``;
            ``"ordinary"``: ``loss.backward()``); ``step()`` refuses the others.
        reads_grad: whether its step reads ``.grad`` of the layers it preconditions
            (then clipping ``.grad`` changes the step; otherwise the step ignores it and
            warns when it was modified).
        factors_grams: whether its step factors a Gram matrix (Cholesky; the toy methods
            form none).
    """

    error_inputs: list[tuple[dict[str, Any], str]]
    linear_conv_only: bool = False
    loops: tuple[str, ...] = ("uniform", "ordinary")
    reads_grad: bool = False
    factors_grams: bool = True


#: ``(name, value, match)`` every method refuses.
COMMON_ERROR_INPUTS = [
    ("lr", 0.0, "lr must be > 0"),
    ("lr", -1.0, "lr must be > 0"),
    ("lr", math.nan, "lr must be a finite number"),
    ("lr", math.inf, "lr must be a finite number"),
    ("lr", "0.1", "lr must be a finite number"),
    ("lr", True, "lr must be a finite number"),
    ("momentum", 1.0, "momentum must be < 1"),
    ("momentum", -0.1, "momentum must be >= 0"),
    ("momentum", -0.5, "momentum must be >= 0"),
    ("weight_decay", -1e-3, "weight_decay must be >= 0"),
    ("weight_decay", -1.0, "weight_decay must be >= 0"),
    ("weight_decay", math.nan, "weight_decay must be a finite number"),
    ("damping", -1.0, "damping must be"),
    ("damping", math.inf, "damping must be a finite number"),
    ("damping", math.nan, "damping must be a finite number"),
    ("loss", "hinge", "unknown loss 'hinge'"),
]

METHODS: dict[type[SampleSpaceOptimizer], MethodInfo] = {
    GGN: MethodInfo(
        [
            ({"damping": -0.1}, "damping must be >= 0"),
            ({"solver": "magic"}, "unknown solver 'magic'"),
            ({"solver": "cg", "solver_options": {"tol": 2.0}}, "tol must be"),
            ({"solver_options": {"rank": 3}}, "takes no option"),
            ({"loss": "cross_entropy", "damping": 0.0}, "damping must be > 0 with loss='cross_entropy'"),
        ],
        loops=("uniform",),
    ),
    SENG: MethodInfo(
        [
            ({"damping": 0.0}, "damping must be > 0"),
            ({"damping": -1.0}, "damping must be > 0"),
            ({"damping": lambda step: 0.0}, "damping schedule must return a finite number > 0"),
            ({"curvature_every": 0}, "curvature_every must be an int >= 1"),
            ({"curvature_every": 2.5}, "curvature_every must be an int >= 1"),
            ({"sketch": 0.5}, "sketch must be a gramopt.SketchConfig"),
            ({"sketch": SketchConfig(size=10_000)}, "larger than layer"),
            ({"sketch": SketchConfig(size=43)}, r"size=43 is larger than layer 0 \(42 parameters\)"),
            (
                {"sketch": SketchConfig(factor_size=4), "implicit": ImplicitConfig(threshold=1)},
                r"factor_size=4 is larger than implicit layer 4 .*n_G=3",
            ),
            ({"implicit": dict(threshold=1)}, "implicit must be a gramopt.ImplicitConfig"),
        ],
        reads_grad=True,
    ),
    FNGD: MethodInfo(
        [
            ({"damping": 0.0}, "damping must be > 0"),
            ({"damping": -0.1}, "damping"),
            ({"coefficient_steps": 0}, "coefficient_steps must be None"),
            ({"coefficient_steps": -3}, "coefficient_steps"),
            ({"coefficient_steps": 2.5}, "coefficient_steps"),
            ({"coefficient_steps": True}, "coefficient_steps"),
        ],
        linear_conv_only=True,
    ),
    DiagonalFisher: MethodInfo([({"damping": 0.0}, "damping must be > 0")], factors_grams=False),
    DiagonalGaussNewton: MethodInfo(
        [({"damping": 0.0}, "damping must be > 0"), ({"loss": "cross_entropy"}, "takes loss='mse'")],
        loops=("uniform",),
        factors_grams=False,
    ),
}

CASES: list[OptimizerCase] = [
    # GGN: each solver, both losses
    # the cross-entropy cases at lr 0.5, damping 0.1 grow the loss > 100x (DivergenceError by default)
    OptimizerCase("ggn-cholesky-mse", GGN, dict(lr=0.5, damping=0.1), representative=True),
    OptimizerCase(
        "ggn-cholesky-ce-momentum-wd", GGN, dict(lr=0.5, damping=0.1, momentum=0.9, weight_decay=0.01, divergence=None),
        loss="cross_entropy", representative=True,
    ),
    OptimizerCase("ggn-cg-mse", GGN, dict(lr=0.5, damping=0.1, solver="cg")),
    OptimizerCase(
        "ggn-sketch-pcg-mse", GGN, dict(lr=0.5, damping=0.1, solver="sketch-pcg", solver_options={"seed": 1}),
        model="wide",
    ),
    OptimizerCase(
        "ggn-nystrom-pcg-ce", GGN,
        dict(lr=0.5, damping=0.1, solver="nystrom-pcg", solver_options={"rank": 4}, divergence=None),
        loss="cross_entropy",
    ),
    OptimizerCase("ggn-auto-mse-momentum", GGN, dict(lr=0.5, damping=0.1, solver="auto", momentum=0.5), model="wide"),
    OptimizerCase(
        "ggn-transformer-ce", GGN, dict(lr=0.5, damping=0.1, divergence=None),
        loss="cross_entropy", model="transformer",
    ),
    # SENG: exact, sketched, implicit layers, curvature_every > 1, damping schedule, both loops
    OptimizerCase(
        "seng-exact-ce-momentum", SENG, dict(lr=0.1, damping=0.5, momentum=0.9),
        loss="cross_entropy", representative=True,
    ),
    OptimizerCase(
        "seng-sketch-leverage-mse-every3", SENG,
        dict(lr=0.1, damping=0.5, curvature_every=3, sketch=SketchConfig(size=0.5, sampling="leverage", seed=3)),
    ),
    OptimizerCase(
        "seng-sketch-uniform-ce-wd-ordinary", SENG,
        dict(lr=0.1, damping=0.5, weight_decay=0.01, sketch=SketchConfig(size=6, sampling="uniform", seed=4)),
        loss="cross_entropy", loop="ordinary", representative=True,
    ),
    OptimizerCase(
        "seng-implicit-mse-every2", SENG,
        dict(lr=0.1, damping=0.5, momentum=0.9, curvature_every=2, implicit=ImplicitConfig(threshold=40)),
    ),
    OptimizerCase(
        "seng-implicit-sketch-cnn-ordinary", SENG,
        dict(
            lr=0.1, damping=0.5, implicit=ImplicitConfig(threshold=30, rank=2),
            sketch=SketchConfig(size=0.5, factor_size=0.5, sampling="uniform", seed=1),
        ),
        loss="cross_entropy", model="cnn", loop="ordinary",
    ),
    OptimizerCase(
        "seng-damping-schedule-ce", SENG, dict(lr=0.1, damping=gramopt.DampingDecay(0.5, 0.8, every=1)),
        loss="cross_entropy",
    ),
    # FNGD: every step (no sharing), and crossing from estimation into sharing
    OptimizerCase("fngd-every-step-ce", FNGD, dict(lr=0.1, damping=0.05), loss="cross_entropy", representative=True),
    OptimizerCase(
        "fngd-sharing-ce-momentum", FNGD, dict(lr=0.1, damping=0.05, momentum=0.9, coefficient_steps=3),
        loss="cross_entropy", permutation_invariant=False,
    ),
    OptimizerCase(
        "fngd-sharing-cnn-mse-wd-ordinary", FNGD, dict(lr=0.1, damping=0.05, weight_decay=0.01, coefficient_steps=2),
        model="cnn", loop="ordinary", permutation_invariant=False, representative=True,
    ),
    # the toy methods (tests/toy_method.py): the contract holds for a method written on it
    OptimizerCase(
        "toy-fisher-ce", DiagonalFisher, dict(lr=0.1, damping=0.05), loss="cross_entropy", representative=True,
    ),
    OptimizerCase(
        "toy-fisher-cnn-mse-momentum-wd-ordinary", DiagonalFisher,
        dict(lr=0.05, damping=0.05, momentum=0.9, weight_decay=0.01),
        model="cnn", loop="ordinary",
    ),
    OptimizerCase("toy-gauss-newton-mse", DiagonalGaussNewton, dict(lr=0.5, damping=0.1), representative=True),
]

REPRESENTATIVE = [case for case in CASES if case.representative]
ids = [case.id for case in CASES]


def first_module_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the first module that has any (weight and bias of the
    first layer): a layer-aligned param group for every method."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            return own
    raise ValueError("the model has no trainable parameter")


def two_groups(model: nn.Module, **second: Any) -> list[dict[str, Any]]:
    """Param groups: the first layer's parameters, then the others (with ``second``'s
    options, e.g. another lr)."""
    first = first_module_params(model)
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in first)]
    return [{"params": first}, {"params": rest, **second}]


def last_module_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the last module that has any (the output layer)."""
    found = None
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            found = own
    if found is None:
        raise ValueError("the model has no trainable parameter")
    return found


def hook_count(model: nn.Module) -> int:
    """Every module hook (forward, pre-forward, backward, state-dict...) and parameter hook."""
    count = 0
    for module in model.modules():
        for name, value in vars(module).items():
            if name.endswith("hooks") and isinstance(value, dict):
                count += len(value)
    for p in model.parameters():
        count += len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return count


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]
