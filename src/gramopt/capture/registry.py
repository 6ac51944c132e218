"""The registry of layer types: module type -> :class:`~gramopt.capture.handlers.LayerHandler`
(BackPACK's module -> extension dict). The capture engine hooks every module whose type
(or a base class of it) is registered; users add their own with :func:`register_handler`."""

from __future__ import annotations

from torch import nn

from gramopt.capture.attention import MultiheadAttentionHandler
from gramopt.capture.handlers import (
    BatchNormHandler,
    ConvHandler,
    EmbeddingHandler,
    GroupNormHandler,
    LayerHandler,
    LayerNormHandler,
    LinearHandler,
)

_REGISTRY: dict[type, LayerHandler] = {
    nn.Linear: LinearHandler(),
    nn.Conv1d: ConvHandler(),
    nn.Conv2d: ConvHandler(),
    nn.Conv3d: ConvHandler(),
    nn.ConvTranspose1d: ConvHandler(),
    nn.ConvTranspose2d: ConvHandler(),
    nn.ConvTranspose3d: ConvHandler(),
    nn.modules.batchnorm._BatchNorm: BatchNormHandler(),
    nn.Embedding: EmbeddingHandler(),
    nn.LayerNorm: LayerNormHandler(),
    nn.GroupNorm: GroupNormHandler(),
    nn.MultiheadAttention: MultiheadAttentionHandler(),
}
if hasattr(nn, "RMSNorm"):
    _REGISTRY[nn.RMSNorm] = LayerNormHandler()


def register_handler(module_type: type, handler: LayerHandler) -> None:
    """Support ``module_type`` (and its subclasses) with ``handler``."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a LayerHandler, got {type(handler).__name__}")
    if handler.proxy_name is not None:
        missing = [m for m in ("proxy", "attach", "detach") if getattr(type(handler), m) is getattr(LayerHandler, m)]
        if missing:
            raise TypeError(f"{type(handler).__name__} sets proxy_name but does not define {', '.join(missing)}")
    _REGISTRY[module_type] = handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of the most specific registered type in the module's MRO, if any."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None
