"""gramopt: sample-space second-order optimizers for PyTorch.

Curvature lives in a b x b Gram matrix over the mini-batch, never in a p x p matrix
over the parameters.

Optimizers
    GGN         Gram-Gauss-Newton (regression; generalized Gauss-Newton for classification;
                AdaptiveDamping)
    SENG        sketchy empirical natural gradient (SketchConfig, ImplicitConfig;
                schedules WarmupPolyDecay, DampingDecay)
    FNGD        inverse-free fast natural gradient (per-layer weighted per-sample gradients,
                coefficients shared after an estimation phase)
    GaussNewton Gauss-Newton for any least-squares residual: loss = opt.step(residuals)
                (physics-informed networks and other residual problems)

Physics-informed residuals (gramopt.pde)
    pde.forward_laplacian (value, gradient and Laplacian through the model's own modules),
    pde.Derivatives, pde.register_activation, pde.Sin; pde.problems (the papers' Poisson and
    heat problems)

Extending
    register_handler, LayerHandler, LayerFactors, ExplicitFactors

Errors
    UnsupportedModuleError, NonFiniteError, DivergenceError, SingularSystemError, CaptureError,
    DistributedError, CollectiveError

Data parallelism
    distributed="exact" | "local" on every optimizer; gramopt.distributed explains both
"""

from gramopt import pde
from gramopt.capture import ExplicitFactors, LayerFactors, LayerHandler, register_handler
from gramopt.distributed import CollectiveError, DistributedError
from gramopt.errors import (
    CaptureError,
    DivergenceError,
    GramoptError,
    NonFiniteError,
    SingularSystemError,
    UnsupportedModuleError,
)
from gramopt.linalg import NumericalWarning
from gramopt.optim import (
    FNGD,
    GGN,
    SENG,
    AdaptiveDamping,
    DampingDecay,
    GaussNewton,
    ImplicitConfig,
    SketchConfig,
    StepInfo,
    WarmupPolyDecay,
)

__version__ = "0.1.0"

__all__ = [
    "FNGD",
    "GGN",
    "SENG",
    "AdaptiveDamping",
    "CaptureError",
    "CollectiveError",
    "DampingDecay",
    "DistributedError",
    "DivergenceError",
    "ExplicitFactors",
    "GaussNewton",
    "GramoptError",
    "ImplicitConfig",
    "LayerFactors",
    "LayerHandler",
    "NonFiniteError",
    "NumericalWarning",
    "SingularSystemError",
    "SketchConfig",
    "StepInfo",
    "UnsupportedModuleError",
    "WarmupPolyDecay",
    "pde",
    "register_handler",
]
