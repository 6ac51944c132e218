"""Capture engine: hooks on supported layers -> per-layer sample-space factors."""

from gramopt.capture.conv import ConvFactors
from gramopt.capture.engine import CaptureEngine, Layer
from gramopt.capture.factors import ExplicitFactors, LayerFactors, LowRankFactors, LowRankLayout
from gramopt.capture.handlers import LayerHandler
from gramopt.capture.registry import handler_for, register_handler
from gramopt.capture.shared_weight import EmbeddingFactors, SharedWeightFactors

__all__ = [
    "CaptureEngine",
    "ConvFactors",
    "EmbeddingFactors",
    "ExplicitFactors",
    "Layer",
    "LayerFactors",
    "LayerHandler",
    "LowRankFactors",
    "LowRankLayout",
    "SharedWeightFactors",
    "handler_for",
    "register_handler",
]
