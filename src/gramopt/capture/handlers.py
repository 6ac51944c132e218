"""Module handlers: what to keep from a layer's forward pass, how to turn it and the
captured output-gradients into :class:`~gramopt.capture.factors.LayerFactors`, and what
the methods may ask of a layer before any factors exist (its capabilities).

A registry maps module types to handlers (:mod:`gramopt.capture.registry`, BackPACK's
module -> extension dict). Users support their own module types with
:func:`~gramopt.capture.registry.register_handler`; the simplest handler returns
:class:`~gramopt.capture.factors.ExplicitFactors` from per-sample gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramopt.capture import channels
from gramopt.capture.conv import ConvFactors
from gramopt.capture.factors import ExplicitFactors, LayerFactors, LowRankLayout
from gramopt.capture.shared_weight import EmbeddingFactors, SharedWeightFactors
from gramopt.errors import CaptureError, UnsupportedModuleError


class LayerHandler(ABC):
    """How one module type takes part in the sample-space math.

    ``grads`` given to :meth:`factors` is a list with one tensor per forward call of the
    module in this step, each ``[b, k, *output_shape[1:]]``: the output-gradients of the
    k backward passes, already multiplied by the method's scale.

    Capabilities (what a method may ask of a layer, so that no method tests a module's
    type): :attr:`dense_layer`, :attr:`couples_samples`, :attr:`captures_in_eval`,
    :meth:`low_rank_layout`; a handler of a module whose forward it reroutes through a
    proxy module (``nn.MultiheadAttention``) sets :attr:`proxy_name` and defines
    :meth:`proxy`, :meth:`attach` and :meth:`detach`.
    """

    #: Whether the layer is captured in eval mode too (in a model training in train mode):
    #: BatchNorm kept in eval mode, whose affine parameters still train.
    captures_in_eval: bool = False

    #: Whether the module is a dense layer: a weight that multiplies the input (Linear,
    #: convolutions, attention projections), not a lookup table (Embedding) or an
    #: elementwise affine map (norm layers). FNGD preconditions dense layers only (its
    #: paper's fully connected and convolutional layers) and gives the others the plain
    #: gradient by design.
    dense_layer: bool = False

    #: Whether the layer couples the samples of a batch in training mode (BatchNorm's batch
    #: statistics): its rows then sum to the batch gradient but are not per-sample
    #: Jacobian rows, so a method that needs those (GGN) refuses it in training mode.
    couples_samples: bool = False

    #: None (default): the engine hooks the module itself. A name (``"in_proj"``): the
    #: module's forward uses parameters without calling a module (``nn.MultiheadAttention``
    #: reads its projection weights inside ``F.multi_head_attention_forward``), so the
    #: engine hooks a proxy (:meth:`proxy`, named ``<module name>.<proxy_name>``) whose
    #: calls :meth:`attach` makes the module's forward go through; :meth:`save` and
    #: :meth:`factors` then get the proxy. The module's submodules are hooked as usual
    #: (the rerouted forward calls them), and a module :meth:`validate` refuses is refused
    #: with everything below it (its own forward would not call them).
    proxy_name: str | None = None

    def validate(self, module: nn.Module) -> None:
        """Raise :class:`UnsupportedModuleError` for configurations the math can't handle
        (default: every configuration is handled)."""
        return None

    def low_rank_layout(self, module: nn.Module, params: list[nn.Parameter]) -> LowRankLayout | None:
        """How the layer's rows over ``params`` (its covered parameters) factor as
        ``vec(G_r^T A_r)`` (:class:`~gramopt.capture.factors.LowRankLayout`: SENG's implicit
        layers), when its factors always offer
        :meth:`~gramopt.capture.factors.LayerFactors.low_rank_factors`; None (default)
        otherwise."""
        return None

    def proxy(self, module: nn.Module) -> nn.Module:
        """The module the engine hooks in place of ``module`` (only asked when
        :attr:`proxy_name` is set): the one already attached, or a new one."""
        raise NotImplementedError(f"{type(self).__name__} sets proxy_name but defines no proxy()")

    def attach(self, module: nn.Module, proxy: nn.Module) -> None:
        """Make ``module``'s forward call ``proxy`` (once per engine covering it; only with
        :attr:`proxy_name`)."""
        raise NotImplementedError(f"{type(self).__name__} sets proxy_name but defines no attach()")

    def detach(self, module: nn.Module) -> None:
        """Undo one :meth:`attach` (default: nothing to undo)."""
        return None

    def save(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
        """What to keep from a forward call (default: the first input, detached)."""
        if not args or not isinstance(args[0], Tensor):
            raise UnsupportedModuleError(
                f"{type(module).__name__} was called without a tensor as first input"
            )
        return args[0].detach()

    def saved_tensors(self, saved: Any) -> list[Tensor]:
        """The tensors of what :meth:`save` kept from one call, each with the batch
        dimension first (``[b, ...]``): what travels when the batch grows, i.e. what
        ``distributed="exact"`` gathers from every rank and gradient accumulation
        concatenates over micro-batches. Everything else in ``saved`` (flags, options,
        a tensor without a batch dimension) stays in the template that
        :meth:`restore_saved` gets, so it must be the same on every rank and micro-batch.

        Default: ``saved`` itself, one tensor. A handler whose :meth:`save` keeps anything
        else (a tuple, a dict, a tensor whose batch dimension is not first) overrides this
        and :meth:`restore_saved`.
        """
        if not isinstance(saved, Tensor):
            raise CaptureError(
                f"{type(self).__name__}.save kept a {type(saved).__name__}, not one tensor with the batch dimension "
                "first: define its saved_tensors(saved) and restore_saved(template, tensors) (docs/guides/layers.md) "
                "so that distributed='exact' and gradient accumulation can carry it"
            )
        return [saved]

    def restore_saved(self, template: Any, tensors: list[Tensor]) -> Any:
        """What :meth:`save` would have kept from a call on a larger (or other) batch:
        ``template`` with its tensors replaced by ``tensors``, laid out as
        :meth:`saved_tensors` returned those of ``template`` (same count, order and shapes
        past the batch dimension; the batch dimension first). Default: the one tensor."""
        (tensor,) = tensors
        return tensor

    def merge_saved(self, saved: list[Any]) -> Any:
        """What :meth:`save` kept from one call in each of several micro-batches (gradient
        accumulation), as if kept from one call on their concatenated batch (default: each
        of :meth:`saved_tensors` concatenated along the batch dimension, put back by
        :meth:`restore_saved` into the first micro-batch's template)."""
        parts = [self.saved_tensors(s) for s in saved]
        counts = {len(p) for p in parts}
        if len(counts) != 1:
            raise CaptureError(
                f"{type(self).__name__} saved {sorted(counts)} tensors in different micro-batches of one step"
            )
        return self.restore_saved(saved[0], [torch.cat(group, dim=0) for group in zip(*parts, strict=True)])

    @abstractmethod
    def factors(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        saved: list[Any],
        grads: list[Tensor],
    ) -> LayerFactors:
        """Build the layer's factors for this step."""


def _positions(x: Tensor, batch: int, width: int) -> Tensor:
    """View ``[b, *, width]`` as ``[b, s, width]``."""
    return x.reshape(batch, -1, width)


class LinearHandler(LayerHandler):
    """``nn.Linear`` on ``[b, d_in]`` or ``[b, *, d_in]`` inputs (sequence models)."""

    def save(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
        x = super().save(module, args, output)
        if x.dim() < 2:
            raise UnsupportedModuleError(
                f"Linear got an input of shape {tuple(x.shape)}: gramopt needs a leading batch dimension"
            )
        indicator = channels.active_bias_positions()
        if indicator is not None:  # derivative channels: the bias reaches some positions only
            x = channels.append_bias_indicator(x, indicator, type(module).__name__)
        return x

    dense_layer = True

    def low_rank_layout(self, module, params):
        return weight_bias_layout(module, params)

    def factors(self, module, params, saved, grads):
        return linear_factors(module, params, module.weight, module.bias, saved, grads)


def weight_bias_layout(module: nn.Module, params: list[nn.Parameter]) -> LowRankLayout:
    """The :class:`~gramopt.capture.factors.LowRankLayout` of a layer ``y = W x + c`` with
    ``module.weight`` ``[d_out, *]`` and ``module.bias`` (covered where among ``params``)."""
    weight, bias = module.weight, module.bias
    with_weight = any(p is weight for p in params)
    with_bias = bias is not None and any(p is bias for p in params)
    return LowRankLayout(weight.shape[0], weight.shape if with_weight else None, with_bias)


def linear_factors(
    module: nn.Module,
    params: list[nn.Parameter],
    weight: Tensor,
    bias: Tensor | None,
    inputs: list[Tensor],
    grads: list[Tensor],
) -> SharedWeightFactors:
    """Factors of ``y = weight x + bias`` called once per entry of ``inputs`` (each
    ``[b, *, d_in]``) with output-gradients ``grads`` (each ``[b, k, *, d_out]``): the calls'
    positions side by side.

    A call saved with a bias indicator (``[b, C, d_in + 1]``, see
    :mod:`gramopt.capture.channels`) puts the bias on the positions the indicator names
    only; calls without one put it on all of theirs."""
    b, k = grads[0].shape[:2]
    d_out, d_in = weight.shape
    split = [channels.split_bias_indicator(_positions(x, b, x.shape[-1]), d_in) for x in inputs]
    xs = _cat([x for x, _ in split], dim=1)
    zs = _cat([g.reshape(b, k, -1, d_out) for g in grads], dim=2)
    indicator = None
    if any(m is not None for _, m in split):
        ones = [torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if m is None else m for x, m in split]
        indicator = _cat(ones, dim=1).to(zs.dtype)
    return SharedWeightFactors(
        module, params, weight, bias, xs if xs.dtype == zs.dtype else xs.to(zs.dtype), zs, bias_positions=indicator
    )


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` without the copy for a single tensor (one call per step is the rule)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


class ConvHandler(LayerHandler):
    """Convolutions: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` and
    ``nn.ConvTranspose1d`` / ``2d`` / ``3d``, any groups (depthwise included), stride,
    padding, dilation and padding mode.

    Conv1d / Conv2d with groups = 1 are a Linear layer shared over output positions,
    whose factors work through the convolution's own routines
    (:class:`~gramopt.capture.conv.ConvFactors`). The others get their per-sample
    gradients explicitly (:func:`per_sample_rows`, ``[b k, p]``, one vmapped
    weight-gradient of the layer itself): exact, and cheap for the small grouped /
    depthwise kernels they usually have."""

    def save(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
        x = super().save(module, args, output)
        if x.dim() != module.weight.dim():
            raise UnsupportedModuleError(
                f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}: "
                "gramopt needs a leading batch dimension"
            )
        return x

    dense_layer = True

    @staticmethod
    def structured(module: nn.Module) -> bool:
        """Whether the layer gets :class:`~gramopt.capture.conv.ConvFactors` (Conv1d / Conv2d,
        groups = 1) rather than explicit rows."""
        return type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1

    def low_rank_layout(self, module, params):
        return weight_bias_layout(module, params) if self.structured(module) else None

    def factors(self, module, params, saved, grads):
        dtype = grads[0].dtype
        if self.structured(module):
            return ConvFactors(module, params, [x.to(dtype) for x in saved], grads)
        rows = None
        for x, g in zip(saved, grads, strict=True):
            part = per_sample_rows(module, params, x.to(dtype), g)
            rows = part if rows is None else rows + part
        return ExplicitFactors(module, params, rows)


def per_sample_rows(module: nn.Module, params: list[nn.Parameter], x: Tensor, grads: Tensor) -> Tensor:
    """Per-sample gradients of ``<z_ic, module(x_i)>`` with respect to ``params`` (the
    module's own parameters), ``[b k, p]``, rows sample-major, columns in the order of
    ``params``.

    Args:
        module: a layer whose output for sample i depends on sample i's input only.
        x: the input ``[b, ...]``.
        grads: the output-gradients ``[b, k, *output_shape[1:]]``.
    """
    b, k = grads.shape[:2]
    names = [n for n, p in module.named_parameters(recurse=False) if any(p is q for q in params)]
    order = sorted(
        range(len(names)), key=lambda i: [j for j, q in enumerate(params) if q is getattr(module, names[i])][0]
    )
    names = [names[i] for i in order]
    values = tuple(getattr(module, n).detach().to(grads.dtype) for n in names)
    kwargs: dict[str, Any] = {}
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        kwargs["output_size"] = list(grads.shape[3:])

    def one(x_i: Tensor, z_i: Tensor) -> Tensor:
        def forward(*weights: Tensor) -> Tensor:
            return torch.func.functional_call(
                module, dict(zip(names, weights, strict=True)), (x_i.unsqueeze(0),), kwargs
            )

        _, pull = torch.func.vjp(forward, *values)
        return torch.cat([t.reshape(-1) for t in pull(z_i.unsqueeze(0))])

    rows = torch.func.vmap(torch.func.vmap(one, in_dims=(None, 0)), in_dims=(0, 0))(x, grads)
    return rows.reshape(b * k, -1)


class EmbeddingHandler(LayerHandler):
    """``nn.Embedding`` (dense gradients, no max_norm, no scale_grad_by_freq)."""

    def validate(self, module: nn.Module) -> None:
        if module.sparse:
            raise UnsupportedModuleError(
                "Embedding(sparse=True): sparse gradients are not supported; build it with sparse=False"
            )
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                "Embedding(scale_grad_by_freq=True) couples the samples of a batch and is not supported; "
                "build it with scale_grad_by_freq=False"
            )
        if module.max_norm is not None:
            raise UnsupportedModuleError(
                "Embedding(max_norm=...) renormalizes weights in the forward pass and is not supported; "
                "build it with max_norm=None"
            )

    def save(self, module, args, output):
        idx = super().save(module, args, output)
        if idx.dim() < 1 or idx.dim() == 1 and output.dim() == 1:
            raise UnsupportedModuleError("Embedding needs a leading batch dimension")
        return idx

    def factors(self, module, params, saved, grads):
        b, k = grads[0].shape[:2]
        d = module.embedding_dim
        idx = torch.cat([i.reshape(b, -1) for i in saved], dim=1)
        zs = torch.cat([g.reshape(b, k, -1, d) for g in grads], dim=2)
        if module.padding_idx is not None:
            zs = zs * (idx != module.padding_idx).view(b, 1, -1, 1).to(zs.dtype)
        return EmbeddingFactors(module, params, idx, zs, module.num_embeddings)


class _AffineNormHandler(LayerHandler):
    """Norm layers whose affine parameters act elementwise on the normalized input:
    per-sample gradients are small, so the factors are explicit."""

    @abstractmethod
    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input normalized without the affine transform, same shape as x."""

    @abstractmethod
    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        """Dims of ``[b, k, *x.shape[1:]]`` summed to get per-sample parameter gradients."""

    def factors(self, module, params, saved, grads):
        b, k = grads[0].shape[:2]
        rows = {id(p): 0.0 for p in params}
        for x, g in zip(saved, grads, strict=True):
            x = x.to(g.dtype)
            dims = self.reduce_dims(module, x)
            if getattr(module, "weight", None) is not None and id(module.weight) in rows:
                xhat = self.normalize(module, x).unsqueeze(1)
                rows[id(module.weight)] = rows[id(module.weight)] + _sum(g * xhat, dims)
            if getattr(module, "bias", None) is not None and id(module.bias) in rows:
                rows[id(module.bias)] = rows[id(module.bias)] + _sum(g, dims)
        u = torch.cat([rows[id(p)].reshape(b * k, -1) for p in params], dim=1)
        return ExplicitFactors(module, params, u)


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Sum over ``dims``; an empty tuple sums nothing (torch's ``sum(dim=())`` sums all)."""
    return t.sum(dim=dims) if dims else t


class LayerNormHandler(_AffineNormHandler):
    """``nn.LayerNorm`` (and ``nn.RMSNorm``) with elementwise affine parameters."""

    def normalize(self, module, x):
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, eps=module.eps)
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)

    def reduce_dims(self, module, x):
        # [b, k, *lead, *normalized]: sum over the leading non-normalized dims
        lead = x.dim() - 1 - len(module.normalized_shape)
        return tuple(range(2, 2 + lead))


class GroupNormHandler(_AffineNormHandler):
    """``nn.GroupNorm`` with affine parameters (per-channel weight and bias)."""

    def normalize(self, module, x):
        return F.group_norm(x, module.num_groups, eps=module.eps)

    def reduce_dims(self, module, x):
        # [b, k, C, *spatial]: sum over spatial dims
        return tuple(range(3, x.dim() + 1))


class BatchNormHandler(_AffineNormHandler):
    """``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` with affine parameters.

    The input is normalized when the layer runs (:meth:`save`): with the batch
    statistics in training mode, with the running statistics in eval mode. The rows of
    sample i are ``sum_s z_is * xhat_is`` (weight) and ``sum_s z_is`` (bias), so they sum
    to the batch gradient. In training mode the batch statistics couple the samples: the
    rows (of this layer, and of every layer before it, whose output-gradients pass
    through the batch statistics) are then not the gradients of per-sample losses, but
    rows whose sum is the batch gradient, which is what SENG's and FNGD's empirical
    Fisher uses (both papers train BatchNorm networks). GGN refuses training mode (its
    Jacobian rows would need the statistics held constant)."""

    captures_in_eval = True
    couples_samples = True

    def save(self, module, args, output):
        x = super().save(module, args, output)
        if x.dim() < 2:
            raise UnsupportedModuleError(f"{type(module).__name__} needs a leading batch dimension")
        use_batch = module.training or module.running_mean is None
        return F.batch_norm(
            x, None if use_batch else module.running_mean, None if use_batch else module.running_var,
            training=use_batch, eps=module.eps,
        )

    def validate(self, module: nn.Module) -> None:
        if not module.affine:
            raise UnsupportedModuleError("BatchNorm without affine parameters has nothing to train")

    def normalize(self, module, x):
        return x  # saved normalized

    def reduce_dims(self, module, x):
        return tuple(range(3, x.dim() + 1))
