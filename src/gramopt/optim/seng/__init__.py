"""Sketchy empirical natural gradient: the optimizer (``optimizer.py``, Algorithm 1-2),
its options (``config.py``), the explicit layers' curvature (``explicit.py``: U, row
sampling), the implicit layers' low-rank factors (``implicit.py``: Eq. 17-24) and the
cached shifted solve both share (``solve.py``)."""

from gramopt.optim.seng.config import ImplicitConfig, SketchConfig
from gramopt.optim.seng.optimizer import SENG

__all__ = ["SENG", "ImplicitConfig", "SketchConfig"]
