"""``nn.MultiheadAttention`` as two Linear layers: its in-projection and its out-projection.

``F.multi_head_attention_forward`` reads the projection weights directly (it never calls
``out_proj`` as a module), so no module hook sees their inputs or output-gradients. While
an optimizer covers an attention module, :func:`attach` gives the module an instance
``forward`` (:class:`AttentionForward`) that computes the same function in three parts:

1. the in-projection, ``q, k, v = W_q x_q + b_q, W_k x_k + b_k, W_v x_v + b_v``, as the call
   of a small proxy module (:class:`InProjection`, not registered in the model, so
   ``state_dict`` and ``named_modules`` are unchanged) whose hook captures the inputs and the
   output-gradients exactly as a Linear layer's;
2. scaled dot-product attention over heads (masks, ``is_causal``, dropout and
   ``need_weights`` as ``F.multi_head_attention_forward`` treats them);
3. the out-projection, as a call of the module's own ``out_proj`` (an ``nn.Linear``), which
   the ordinary Linear handler captures.

Only training-mode forwards with autograd enabled and batched inputs take this path; any
other call runs the module's own forward. A training-mode call that cannot (unbatched
inputs) leaves the projections without captured rows: the optimizer's stray-parameter
rule gives them the plain gradient with a warning naming them, or, when no layer at all
was captured, its step refuses with a clear error and changes nothing.

Per-sample gradients of the in-projection, for sample i with positions s (queries) and
t (keys / values) and output-gradients z:

    dW_q = sum_s z^q_is x^q_is^T,   dW_k = sum_t z^k_it x^k_it^T,   dW_v = sum_t z^v_it x^v_it^T,
    db   = [sum_s z^q_is, sum_t z^k_it, sum_t z^v_it].

With one packed weight ``in_proj_weight = [W_q; W_k; W_v]`` and self-attention (query, key
and value the same tensor), that is one Linear layer ``x -> in_proj_weight x + in_proj_bias``
of output width 3E (:class:`~gramopt.capture.shared_weight.SharedWeightFactors`). Otherwise
(cross-attention, or separate ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` with
``kdim`` / ``vdim`` other than ``embed_dim``) the rows are formed explicitly from the three
products above (:class:`~gramopt.capture.factors.ExplicitFactors`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramopt.capture.factors import ExplicitFactors, LayerFactors
from gramopt.capture.handlers import LayerHandler, linear_factors
from gramopt.errors import UnsupportedModuleError

PROXY = "_gramopt_in_projection"
_USERS = "_gramopt_attention_users"


def validate(module: nn.MultiheadAttention) -> None:
    """Raise :class:`UnsupportedModuleError` for attention options whose parameters are
    not a Linear layer's: ``add_bias_kv`` (learned key/value biases appended as an extra
    position)."""
    if module.bias_k is not None or module.bias_v is not None:
        raise UnsupportedModuleError(
            "MultiheadAttention(add_bias_kv=True) appends learned key/value biases that are not a "
            "Linear layer's parameters; build it without add_bias_kv"
        )


def in_projection_params(module: nn.MultiheadAttention) -> list[nn.Parameter]:
    """The in-projection's parameters in a fixed order: weights (packed, or q, k, v), then the bias."""
    if module._qkv_same_embed_dim:
        weights = [module.in_proj_weight]
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    return [p for p in (*weights, module.in_proj_bias) if p is not None]


class InProjection(nn.Module):
    """The in-projection of an attention module as a module of its own (a hook target).

    ``forward(query, key, value)`` with batch-first inputs ``[b, L, E]``, ``[b, S, kdim]``,
    ``[b, S, vdim]`` returns ``[b, L, 3E]`` (packed weight and one input tensor: q, k, v
    side by side) or ``[b, L + 2S, E]`` (q, k, v one after the other along positions).
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.__dict__["attention"] = attention  # a reference, not a submodule

    @property
    def weight(self) -> Tensor:
        """The packed weight ``[3E, E]`` (the only form :class:`SharedWeightFactors` needs)."""
        return self.attention.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.attention.in_proj_bias

    def is_packed_self(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        return self.attention._qkv_same_embed_dim and query is key and key is value

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        m = self.attention
        if m._qkv_same_embed_dim:
            return m.in_proj_weight.chunk(3)
        return m.q_proj_weight, m.k_proj_weight, m.v_proj_weight

    def biases(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        b = self.attention.in_proj_bias
        return (None, None, None) if b is None else b.chunk(3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        if self.is_packed_self(query, key, value):
            return F.linear(query, self.attention.in_proj_weight, self.attention.in_proj_bias)
        parts = [F.linear(x, w, b) for x, w, b in zip((query, key, value), self.weights(), self.biases(), strict=True)]
        return torch.cat(parts, dim=1)


class AttentionForward:
    """The instance ``forward`` :func:`attach` installs: :func:`captured_attention` for
    training-mode, grad-enabled, batched calls, the module's own forward otherwise.
    Holds the module (not the optimizer), so a deep copy or a pickle of the model keeps
    working."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        self.module = module

    def __call__(self, query: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """The arguments of ``nn.MultiheadAttention.forward``, passed on unchanged."""
        m = self.module
        proxy = m.__dict__.get(PROXY)
        if proxy is None or not (m.training and torch.is_grad_enabled() and query.dim() == 3):
            return type(m).forward(m, query, *args, **kwargs)
        return captured_attention(m, proxy, query, *args, **kwargs)


def captured_attention(
    m: nn.MultiheadAttention,
    proxy: InProjection,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``m(query, key, value, ...)`` for batched inputs, with the in-projection computed by
    ``proxy`` and the out-projection by ``m.out_proj`` (both hookable calls).

    Returns:
        the attention output (``[b, L, E]`` if ``m.batch_first`` else ``[L, b, E]``) and the
        attention weights (``[b, L, S]`` averaged over heads, ``[b, H, L, S]`` otherwise, or
        None without ``need_weights``), as ``nn.MultiheadAttention.forward``.
    """
    if not m.batch_first:  # [L, b, E] -> [b, L, E], keeping "query is key is value"
        if query is key and key is value:
            query = key = value = query.transpose(0, 1)
        elif key is value:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
            value = key
        else:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    b, tgt_len, embed_dim = query.shape
    src_len = key.shape[1]
    heads, head_dim = m.num_heads, m.head_dim
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
    causal_hint = is_causal and key_padding_mask is None and not need_weights
    if causal_hint:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )

    packed_self = proxy.is_packed_self(query, key, value)
    projected = proxy(query, key, value)
    if packed_self:
        q, k, v = projected.chunk(3, dim=-1)
    else:
        q, k, v = projected.split([tgt_len, src_len, src_len], dim=1)
    if m.add_zero_attn:
        zeros = torch.zeros(b, 1, embed_dim, dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src_len = k.shape[1]
    mask = _merged_mask(attn_mask, key_padding_mask, b, heads, tgt_len, src_len)
    q, k, v = (t.reshape(b, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # [b, H, *, hd]
    dropout_p = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weights @ v
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal_hint)
    out = m.out_proj(out.transpose(1, 2).reshape(b, tgt_len, embed_dim))
    return (out if m.batch_first else out.transpose(0, 1)), weights


def _merged_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, heads: int, tgt_len: int, src_len: int
) -> Tensor | None:
    """The additive (or boolean) mask ``[b or 1, H or 1, L, S]`` from ``attn_mask`` (``[L, S]``
    or ``[b H, L, S]``) and ``key_padding_mask`` (``[b, S]``), as
    ``F.multi_head_attention_forward`` merges them."""
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be {(tgt_len, src_len)}."
                )
            mask = attn_mask.view(1, 1, tgt_len, src_len)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (b * heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                    f"{(b * heads, tgt_len, src_len)}."
                )
            mask = attn_mask.view(b, heads, tgt_len, src_len)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, src_len):
            raise RuntimeError(
                f"expecting key_padding_mask shape of {(b, src_len)}, but got {tuple(key_padding_mask.shape)}"
            )
        padding = key_padding_mask.view(b, 1, 1, src_len)
        mask = padding if mask is None else mask + padding
    return mask


def attach(module: nn.MultiheadAttention, proxy: InProjection | None = None) -> InProjection:
    """Give ``module`` the capturing forward (once, however many optimizers cover it) and
    return its in-projection proxy (``proxy``, a new one, or the one already attached)."""
    if PROXY not in module.__dict__:
        proxy = proxy if proxy is not None else InProjection(module)
        if proxy.attention is not module:
            raise ValueError("the in-projection proxy belongs to another attention module")
        module.__dict__[PROXY] = proxy
        module.__dict__["forward"] = AttentionForward(module)
        module.__dict__[_USERS] = 0
    module.__dict__[_USERS] += 1
    return module.__dict__[PROXY]


def detach(module: nn.MultiheadAttention) -> None:
    """Undo one :func:`attach`; the last one restores the module's own forward."""
    users = module.__dict__.get(_USERS)
    if users is None:
        return
    if users > 1:
        module.__dict__[_USERS] = users - 1
        return
    for key in (PROXY, "forward", _USERS):
        module.__dict__.pop(key, None)


def in_projection_factors(
    proxy: InProjection,
    params: list[nn.Parameter],
    saved: list[tuple[Tensor, Tensor, Tensor, bool]],
    grads: list[Tensor],
) -> LayerFactors:
    """The in-projection's factors from its calls this step.

    Args:
        proxy: the in-projection.
        params: its covered parameters, in :func:`in_projection_params` order.
        saved: per call, the batch-first inputs (query ``[b, L, E]``, key ``[b, S, kdim]``,
            value ``[b, S, vdim]``) and whether it was a packed self-attention call.
        grads: per call, the output-gradients ``[b, k, L, 3E]`` (packed self-attention) or
            ``[b, k, L + 2S, E]``.
    """
    m = proxy.attention
    if all(packed for *_, packed in saved):
        return linear_factors(proxy, params, m.in_proj_weight, m.in_proj_bias, [query for query, *_ in saved], grads)
    dtype = grads[0].dtype
    rows = None
    for (query, key, value, packed), g in zip(saved, grads, strict=True):
        part = _explicit_rows(m, params, query.to(dtype), key.to(dtype), value.to(dtype), packed, g)
        rows = part if rows is None else rows + part
    return ExplicitFactors(proxy, params, rows)


def _explicit_rows(
    m: nn.MultiheadAttention,
    params: list[nn.Parameter],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    packed: bool,
    g: Tensor,
) -> Tensor:
    """Per-sample gradients of one call, ``[b k, p]`` with columns in ``params`` order."""
    b, k = g.shape[:2]
    e = m.embed_dim
    if packed:
        zq, zk, zv = g.reshape(b, k, -1, 3 * e).chunk(3, dim=-1)
    else:
        zq, zk, zv = g.reshape(b, k, -1, e).split([query.shape[1], key.shape[1], key.shape[1]], dim=2)
    blocks = {}
    per_weight = [torch.einsum("bksz,bsx->bkzx", z, x) for z, x in ((zq, query), (zk, key), (zv, value))]
    if m._qkv_same_embed_dim:
        blocks[id(m.in_proj_weight)] = torch.cat(per_weight, dim=2)  # [b, k, 3E, E]
    else:
        for weight, block in zip((m.q_proj_weight, m.k_proj_weight, m.v_proj_weight), per_weight, strict=True):
            blocks[id(weight)] = block
    if m.in_proj_bias is not None:
        blocks[id(m.in_proj_bias)] = torch.cat([z.sum(dim=2) for z in (zq, zk, zv)], dim=-1)  # [b, k, 3E]
    return torch.cat([blocks[id(p)].reshape(b * k, -1) for p in params], dim=1)


class MultiheadAttentionHandler(LayerHandler):
    """The handler of ``nn.MultiheadAttention``: its in-projection is the layer
    ``<attention>.in_proj``, captured through a proxy (:class:`InProjection`) that the
    rerouted forward (:func:`attach`) calls; ``out_proj`` is an ``nn.Linear`` the rerouted
    forward calls, captured by the Linear handler.

    :meth:`validate`, :meth:`proxy`, :meth:`attach` and :meth:`detach` get the attention
    module; :meth:`save`, :meth:`factors`, :meth:`saved_tensors` and :meth:`restore_saved`
    its in-projection (the hooked module)."""

    dense_layer = True  # (its projections)
    proxy_name = "in_proj"

    def validate(self, module: nn.Module) -> None:
        validate(module)

    def proxy(self, module: nn.Module) -> InProjection:
        return module.__dict__.get(PROXY) or InProjection(module)

    def attach(self, module: nn.Module, proxy: nn.Module) -> None:
        attach(module, proxy)

    def detach(self, module: nn.Module) -> None:
        detach(module)

    def save(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
        """The call's inputs, detached, and whether it was a packed self-attention call
        (one input tensor for q, k and v)."""
        query, key, value = args
        if module.is_packed_self(query, key, value):
            x = query.detach()
            return x, x, x, True
        return query.detach(), key.detach(), value.detach(), False

    def saved_tensors(self, saved: Any) -> list[Tensor]:
        """The batch-first inputs: ``[query]`` of a packed self-attention call (one tensor
        for q, k and v), ``[query, key, value]`` otherwise."""
        query, key, value, packed = saved
        return [query] if packed else [query, key, value]

    def restore_saved(self, template: Any, tensors: list[Tensor]) -> Any:
        if template[3]:
            (x,) = tensors
            return x, x, x, True
        query, key, value = tensors
        return query, key, value, False

    def factors(self, module, params, saved, grads):
        return in_projection_factors(module, params, saved, grads)
