"""Elementwise activations for :func:`gramopt.pde.forward_laplacian`: first and second derivatives.

Pushing derivative channels through ``h = sigma(a)`` needs ``sigma'(a)`` and ``sigma''(a)``
next to the value (Dangel, Müller, Zeinhofer, "Kronecker-Factored Approximate Curvature for
Physics-Informed Neural Networks", NeurIPS 2024, arXiv:2405.15603, Eq. 6 and 7b):

    h = sigma(a),   d_j h = sigma'(a) d_j a,   Lap h = sigma'(a) Lap a + sigma''(a) sum_j (d_j a)^2.

Each supported module type has a *rule* ``(module, a, value) -> (sigma'(a), sigma''(a))``;
the value itself always comes from calling the module, so options such as
``nn.Softplus(beta, threshold)`` or ``nn.GELU(approximate="tanh")`` are the module's own.
:func:`register_activation` adds a type.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: ``(module, a, value) -> (sigma'(a), sigma''(a))``, all shaped like ``a``.
Rule = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


class Sin(nn.Module):
    """``sin(x)``, elementwise (torch has no sine module; SIREN-style PINNs and exact test
    solutions such as ``sum_i cos(pi x_i) = sum_i sin(pi x_i + pi/2)`` use it)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


def _tanh(module: nn.Module, a: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    d1 = 1 - value * value
    return d1, -2 * value * d1


def _sigmoid(module: nn.Module, a: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    d1 = value * (1 - value)
    return d1, d1 * (1 - 2 * value)


def _silu(module: nn.Module, a: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    # sigma(a) = a s(a): sigma' = s (1 + a (1 - s)), sigma'' = s (1 - s) (2 + a (1 - 2 s))
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s)), s * (1 - s) * (2 + a * (1 - 2 * s))


def _softplus(module: nn.Module, a: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    # log(1 + exp(beta a)) / beta below the threshold (in beta a), the identity above it
    beta = module.beta
    s = torch.sigmoid(beta * a)
    linear = beta * a > module.threshold
    return torch.where(linear, torch.ones_like(a), s), torch.where(linear, torch.zeros_like(a), beta * s * (1 - s))


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


def _gelu(module: nn.Module, a: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    if module.approximate == "tanh":
        # 0.5 a (1 + tanh(u)), u = c (a + 0.044715 a^3)
        u1 = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * a * a)
        u2 = _SQRT_2_OVER_PI * 6 * _GELU_CUBIC * a
        t = torch.tanh(_SQRT_2_OVER_PI * (a + _GELU_CUBIC * a * a * a))
        sech2 = 1 - t * t
        return 0.5 * (1 + t) + 0.5 * a * sech2 * u1, sech2 * (u1 + 0.5 * a * (u2 - 2 * t * u1 * u1))
    # a Phi(a): sigma' = Phi(a) + a phi(a), sigma'' = phi(a) (2 - a^2)
    phi = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    return cdf + a * phi, phi * (2 - a * a)


def _sin(module: nn.Module, a: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    return torch.cos(a), -value


_RULES: dict[type[nn.Module], Rule] = {
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.SiLU: _silu,
    nn.Softplus: _softplus,
    nn.GELU: _gelu,
    Sin: _sin,
}


def register_activation(
    module_type: type[nn.Module],
    d1: Callable[[nn.Module, Tensor], Tensor],
    d2: Callable[[nn.Module, Tensor], Tensor],
) -> None:
    """Let :func:`gramopt.pde.forward_laplacian` push derivatives through ``module_type``.

    The module must act elementwise: ``module(a)[i] = sigma(a[i])``.

    Args:
        module_type: an ``nn.Module`` subclass (its subclasses that keep its ``forward`` too).
        d1: ``(module, a) -> sigma'(a)``, shaped like ``a``.
        d2: ``(module, a) -> sigma''(a)``, shaped like ``a``.

    Example:
        >>> class Cube(nn.Module):
        ...     def forward(self, x):
        ...         return x ** 3
        >>> register_activation(Cube, lambda m, a: 3 * a ** 2, lambda m, a: 6 * a)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (callable(d1) and callable(d2)):
        raise TypeError("d1 and d2 must be callables (module, a) -> tensor shaped like a")

    def rule(module: nn.Module, a: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        return d1(module, a), d2(module, a)

    _RULES[module_type] = rule


def activation_rule(module: nn.Module) -> Rule | None:
    """The rule of the most specific registered type in the module's MRO, if the module
    runs that type's ``forward`` (a subclass that overrides it computes something else)."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None


def is_activation(module: nn.Module) -> bool:
    """Whether :func:`activation_rule` knows the module's type (for tracing: a leaf)."""
    return any(cls in _RULES for cls in type(module).__mro__)
