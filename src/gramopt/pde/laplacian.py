"""The forward Laplacian: value, first derivatives and Laplacian in one forward pass.

Li et al., "Forward Laplacian: A New Computational Framework for Neural Network-based
Variational Monte Carlo", arXiv:2307.08214 (published as "A computational framework for
neural network-based variational Monte Carlo with Forward Laplacian", Nature Machine
Intelligence 6, 2024), push the Laplacian forward through a network instead of
differentiating the output twice. In the notation of Dangel, Müller, Zeinhofer,
"Kronecker-Factored Approximate Curvature for Physics-Informed Neural Networks",
NeurIPS 2024, arXiv:2405.15603 (Eq. 5-7, which relate it to Taylor-mode automatic
differentiation), with ``D`` the coordinates the Laplacian sums over:

- input: ``h = x``, ``d_j h = e_j`` (the j-th unit vector), ``Lap h = 0``;
- affine layer ``y = W h + c``: ``y = W h + c``, ``d_j y = W d_j h``, ``Lap y = W Lap h``
  (the bias touches the value only; Eq. 5, 7a);
- elementwise activation ``y = sigma(a)``: ``d_j y = sigma'(a) d_j a``,
  ``Lap y = sigma'(a) Lap a + sigma''(a) sum_{j in D} (d_j a)^2`` (Eq. 6, 7b).

The channels ride through each ``nn.Linear`` as positions of one sample: the layer is
called once on ``[N, C, width]`` with C = (value, g first derivatives, Laplacian), so the
capture engine's hooks see every use of every weight, and one backward pass of a residual
built from the result gives every layer's per-point Jacobian rows. The module adds its bias
to every channel; it is subtracted again from the derivative channels outside the module,
and :mod:`gramopt.capture.channels` tells the hooks that the bias belongs to the value
channel only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gramopt.capture.channels import bias_positions
from gramopt.errors import UnsupportedModuleError
from gramopt.pde.activations import activation_rule, is_activation

_FUNCTIONAL = 'jacobian="functional"'


@dataclass(frozen=True)
class Derivatives:
    """What :func:`forward_laplacian` returns, for N points and a model with k outputs.

    Attributes:
        value: ``u(x)``, ``[N, k]``.
        gradient: ``d u / d x_j`` for j in ``gradient_dims``, ``[N, k, g]``.
        laplacian: ``sum_{j in dims} d^2 u / d x_j^2``, ``[N, k]``.
    """

    value: Tensor
    gradient: Tensor
    laplacian: Tensor


def forward_laplacian(
    model: nn.Module, x: Tensor, dims: Sequence[int] | None = None, *, gradient_dims: Sequence[int] | None = None
) -> Derivatives:
    """Value, gradient and Laplacian of ``model`` at the points ``x`` in one forward pass.

    Supported models: ``nn.Sequential`` (nested) of ``nn.Linear``, ``nn.Identity`` and
    elementwise activations (``nn.Tanh``, ``nn.Sigmoid``, ``nn.SiLU``, ``nn.Softplus``,
    ``nn.GELU``, :class:`gramopt.pde.Sin`, and types added with
    :func:`gramopt.pde.register_activation`), and modules whose ``forward`` only calls such
    modules one after the other (checked by tracing it with ``torch.fx``). Anything else
    raises :class:`~gramopt.UnsupportedModuleError` naming the module: compute such
    residuals with torch's own differentiation (``jacobian="functional"``).

    Args:
        model: the network, ``[N, d_in] -> [N, k]``.
        x: the points, ``[N, d_in]``, floating point (float64 is what PINNs need).
        dims: the coordinates the Laplacian sums over (distinct indices into ``x``'s second
            dimension; default: all), e.g. the spatial ones of a heat equation's ``(t, x)``.
        gradient_dims: the coordinates of ``.gradient`` (default: ``dims``); must contain
            ``dims``. A heat equation needs ``gradient_dims`` with the time coordinate.

    Returns:
        :class:`Derivatives` with ``value [N, k]``, ``gradient [N, k, g]`` (g =
        ``len(gradient_dims)``, in that order) and ``laplacian [N, k]``; all differentiable
        with respect to the model's parameters.

    Cost: one forward pass on ``g + 2`` channels per point, i.e. about ``g + 2`` times an
    ordinary forward pass (the first layer's derivative channels are unit vectors). A model
    that is not an ``nn.Sequential`` is traced again at every call (milliseconds; nothing is
    cached, so a changed model is never read from a stale trace).
    """
    d_in = _check_points(x)
    lap = _check_dims(dims, d_in, "dims") if dims is not None else tuple(range(d_in))
    grad = _check_dims(gradient_dims, d_in, "gradient_dims") if gradient_dims is not None else lap
    missing = [j for j in lap if j not in grad]
    if missing:
        raise ValueError(
            f"gradient_dims {list(grad)} must contain every coordinate of dims {list(lap)} (missing {missing}): "
            "the Laplacian is built from those first derivatives"
        )
    layers = model_layers(model)
    _check_dtype(model, x)
    g = len(grad)
    channels = g + 2
    lap_channels = torch.tensor([grad.index(j) for j in lap], device=x.device)
    # channel 0: value; 1..g: first derivatives along grad; g + 1: Laplacian
    unit = torch.eye(d_in, dtype=x.dtype, device=x.device)[list(grad)]
    h = torch.cat([x.unsqueeze(1), unit.expand(x.shape[0], g, d_in), x.new_zeros(x.shape[0], 1, d_in)], dim=1)
    derivative_channels = torch.ones(channels, 1, dtype=x.dtype, device=x.device)
    derivative_channels[0] = 0
    with bias_positions([1.0] + [0.0] * (channels - 1)):
        for _, module in layers:
            if isinstance(module, nn.Linear):
                h = module(h)
                if module.bias is not None:  # the bias belongs to the value channel only
                    h = h - derivative_channels * module.bias
            elif isinstance(module, nn.Identity):
                continue
            else:
                h = _activation(module, h, g, lap_channels)
    return Derivatives(value=h[:, 0], gradient=h[:, 1 : g + 1].transpose(1, 2), laplacian=h[:, g + 1])


def _activation(module: nn.Module, h: Tensor, g: int, lap_channels: Tensor) -> Tensor:
    """``sigma`` applied to the channels ``h [N, g + 2, w]`` (module doc)."""
    a, da, la = h[:, 0], h[:, 1 : g + 1], h[:, g + 1]
    value = module(a.clone() if getattr(module, "inplace", False) else a)
    d1, d2 = activation_rule(module)(module, a, value)
    squares = da.index_select(1, lap_channels).pow(2).sum(dim=1)
    return torch.cat([value.unsqueeze(1), d1.unsqueeze(1) * da, (d1 * la + d2 * squares).unsqueeze(1)], dim=1)


def model_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules ``model`` applies one after the other, with their names: nested
    Sequentials unrolled, other containers traced with ``torch.fx``. Raises
    :class:`~gramopt.UnsupportedModuleError` naming the first module that
    :func:`forward_laplacian` cannot push derivatives through."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _layers(model, type(model).__name__)


def _layers(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    if _is_leaf(module):
        _check_leaf(module, name)
        return [(name, module)]
    if type(module) is nn.Sequential:
        # (as Sequential.forward: every entry, a module listed twice included; named_children skips repeats)
        children = [(child_name, child) for child_name, child in module._modules.items() if child is not None]
        return [item for child_name, child in children for item in _layers(child, f"{name}.{child_name}")]
    chain = _traced_chain(module, name)
    return [item for child_name, child in chain for item in _layers(child, f"{name}.{child_name}")]


def _is_leaf(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Identity)) or is_activation(module)


def _check_leaf(module: nn.Module, name: str) -> None:
    label = f"{name} ({type(module).__name__})"
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            raise UnsupportedModuleError(
                f"forward_laplacian: {label} overrides nn.Linear.forward, so it may not compute W x + b; "
                f"compute this model's derivatives with {_FUNCTIONAL}"
            )
    elif isinstance(module, nn.Identity):
        return
    elif activation_rule(module) is None:
        raise UnsupportedModuleError(
            f"forward_laplacian: {label} overrides the forward of a registered activation; register its "
            f"derivatives with gramopt.pde.register_activation, or use {_FUNCTIONAL}"
        )


def _unsupported(label: str, why: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"forward_laplacian cannot push derivatives through {label}: {why}. Supported: nn.Sequential of "
        "nn.Linear and elementwise activations (Tanh, Sigmoid, SiLU, Softplus, GELU, gramopt.pde.Sin, and "
        "types added with gramopt.pde.register_activation), or a module whose forward calls such modules one "
        f"after the other. Compute this model's derivatives with {_FUNCTIONAL} instead."
    )


def _traced_chain(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The submodules that ``module.forward`` calls one after the other, ``x -> m_1 -> ... -> m_L``,
    read from a ``torch.fx`` trace; anything else in the forward (a tensor operation, a second
    input, a module whose output is used twice or not at all) raises."""
    import torch.fx

    label = f"{name} ({type(module).__name__})"
    if not any(True for _ in module.children()):
        raise _unsupported(label, "it is not a supported layer or activation")

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return type(m) is not nn.Sequential and (_is_leaf(m) or super().is_leaf_module(m, qualified_name))

    try:
        graph = Tracer().trace(module)
    except Exception as err:  # noqa: BLE001 (any failure to trace means: not a plain composition)
        why = f"its forward could not be traced with torch.fx ({type(err).__name__}: {err})"
        raise _unsupported(label, why) from err
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise _unsupported(label, f"its forward takes {len(inputs)} inputs, not one")
    for node in nodes:
        if node.op not in ("placeholder", "call_module", "output"):
            target = getattr(node.target, "__name__", node.target)
            raise _unsupported(label, f"its forward computes {target} ({node.op}) outside a module")
    chain: list[tuple[str, nn.Module]] = []
    previous = inputs[0]
    for node in nodes[1:]:
        if len(previous.users) != 1:
            users = ", ".join(str(user.target) for user in previous.users) or "nothing"
            raise _unsupported(label, f"its forward passes {previous.name} to {users}, not to one next module")
        if node.op == "output":
            if node.args != (previous,):
                raise _unsupported(label, "its forward does not return the last module's output")
            break
        if node.args != (previous,) or node.kwargs:
            raise _unsupported(label, f"its forward calls {node.target} on more than the previous output")
        chain.append((node.target, module.get_submodule(node.target)))
        previous = node
    return chain


def _check_points(x: Tensor) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of points [N, d_in], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, d_in] (one point per row), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point (float64 for PINNs), got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("x has no coordinates (shape [N, 0])")
    return x.shape[1]


def _check_dims(dims: Sequence[int], d_in: int, name: str) -> tuple[int, ...]:
    if isinstance(dims, (str, bytes, Tensor)) or not isinstance(dims, Sequence):
        raise TypeError(f"{name} must be a sequence of coordinate indices, got {type(dims).__name__}")
    if not dims:
        raise ValueError(f"{name} is empty: name at least one coordinate of x")
    out = []
    for j in dims:
        if isinstance(j, bool) or not isinstance(j, int):
            raise TypeError(f"{name} must hold ints, got {j!r}")
        if not -d_in <= j < d_in:
            raise ValueError(f"{name} index {j} is out of range for points with {d_in} coordinates")
        out.append(j % d_in)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} {list(dims)} repeats a coordinate")
    return tuple(out)


def _check_dtype(model: nn.Module, x: Tensor) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != x.dtype:
            raise TypeError(
                f"x is {x.dtype} but the model's parameter {name} is {p.dtype}: convert one of them "
                "(model.double() and float64 points for PINNs)"
            )
