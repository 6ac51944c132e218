"""Exceptions raised by gramopt. Each names the problem and what to do about it."""


class GramoptError(Exception):
    """Base class of gramopt's own errors."""


class UnsupportedModuleError(GramoptError, ValueError):
    """A trainable module (or a configuration of one) that the sample-space math can't handle."""


class NonFiniteError(GramoptError, FloatingPointError):
    """A loss, output, target or Gram matrix with NaN or inf; nothing was changed."""


class SingularSystemError(GramoptError, ArithmeticError):
    """The damped sample-space system is singular or too ill-conditioned to solve."""


class CaptureError(GramoptError, RuntimeError):
    """The optimizer was used out of order (e.g. step() without a backward pass)."""


class DistributedError(GramoptError, RuntimeError):
    """Ranks that disagree: settings, layers, shapes or synchronization points."""


class CollectiveError(DistributedError):
    """A collective failed: another rank died, hung past the timeout, or left early."""


class DivergenceError(GramoptError, FloatingPointError):
    """The training loss grew by orders of magnitude: the steps diverge (raise the
    damping or lower the learning rate); nothing was changed by the call that raised."""
