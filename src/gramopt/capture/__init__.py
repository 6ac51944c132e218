"""Capture engine: hooks on supported layers -> per-layer sample-space factors."""

from gramopt.capture.conv import ConvFactors
from gramopt.capture.engine import CaptureEngine, Layer
from gramopt.capture.factors import ExplicitFactors, LayerFactors, LowRankFactors, LowRankLayout
from gramopt.capture.handlers import LayerHandler
from gramopt.capture.per_point import CopiedCall, CopiedCalls, copied_layers, per_point_copies
from gramopt.capture.registry import handler_for, register_handler
from gramopt.capture.shared_weight import EmbeddingFactors, SharedWeightFactors

__all__ = [
    "CaptureEngine",
    "ConvFactors",
    "CopiedCall",
    "CopiedCalls",
    "EmbeddingFactors",
    "ExplicitFactors",
    "Layer",
    "LayerFactors",
    "LayerHandler",
    "LowRankFactors",
    "LowRankLayout",
    "SharedWeightFactors",
    "copied_layers",
    "handler_for",
    "per_point_copies",
    "register_handler",
]
