"""Step 2 of a Gauss-Newton step: the Jacobian ``J = d r / d theta`` ``[M, p]`` of the
residual rows (:mod:`.residuals`), columns in the optimizer's parameter order.

Two ways to the same matrix:

- **hooks** (:func:`hooks_jacobian`): gramopt's capture engine. One backward pass per
  (group g, column c), ``grad_outputs`` one on that group's column c and zero elsewhere,
  down to the hooked layers' outputs only; every forward call of a layer then holds its
  output-gradients, and its factors give per-sample rows (for a forward-Laplacian call,
  the sum over the call's channels, :func:`gramopt.pde.forward_laplacian`). A call with
  N_g samples gives group g's rows; row i of the pass is point i's row. This is exact
  only when residual row i depends on point i's forward call alone (what a plain forward
  or ``forward_laplacian`` gives); :func:`gradient_mismatch` checks it. Parameters that no
  hooked layer covers get their columns from autograd (below).
- **functional** (:func:`functional_columns`): rows of J by vector-Jacobian products
  through the closure's own graph, ``torch.autograd.grad(r, params, grad_outputs=E,
  is_grads_batched=True)`` with E a block of rows of the identity, in blocks of at most
  :data:`JACOBIAN_CHUNK_ELEMENTS` entries of J. Any closure, including derivatives taken
  with ``torch.autograd.grad(create_graph=True)``. Where torch.func can run the closure,
  ``torch.func.jacrev`` through a second call of it (:func:`jacrev_jacobian`) gives the same
  matrix. Either way J costs M vector-Jacobian products through the whole closure: for
  per-point residuals about M times a gradient of L, against about one for the hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gramopt.capture.engine import CaptureEngine
from gramopt.errors import CaptureError
from gramopt.optim.gauss_newton.residuals import Residuals

#: A block of rows of J computed at once by the functional path holds at most this many entries.
JACOBIAN_CHUNK_ELEMENTS = 2**22


class JacobianMismatch(Exception):
    """The hooks' Jacobian is not the residual's (the reason in the message)."""


def column_starts(params: Sequence[nn.Parameter]) -> dict[int, int]:
    """id(p) -> the first column of p in J (parameters flattened, in order)."""
    out, start = {}, 0
    for p in params:
        out[id(p)] = start
        start += p.numel()
    return out


def pass_directions(residuals: Residuals) -> list[Tensor]:
    """One ``grad_outputs`` ``[M]`` per (group, column): one on the rows of that column."""
    flat = residuals.flat
    directions = []
    for (start, end), shape in zip(residuals.group_rows(), residuals.shapes, strict=True):
        for c in range(shape.columns):
            d = torch.zeros_like(flat)
            d[start + c : end : shape.columns] = 1
            directions.append(d)
    return directions


def hooks_jacobian(
    engine: CaptureEngine, residuals: Residuals, params: Sequence[nn.Parameter]
) -> tuple[Tensor, list[nn.Parameter]]:
    """``(J [M, p], the parameters whose columns came from autograd)`` (module doc).
    Raises :class:`JacobianMismatch` when a layer call of one group's size received a
    gradient from another group's rows (a residual that is not per point)."""
    flat = residuals.flat
    directions = pass_directions(residuals)
    if engine.has_factors():
        raise JacobianMismatch(
            "the closure ran a backward pass of its own through the hooked layers (torch.autograd.grad): its "
            "residuals are derivatives of the layers' outputs, whose rows the hooks cannot give"
        )
    try:
        engine.backward_passes(flat, directions, retain_graph=True)
    except CaptureError:
        per_call = {}  # no hooked layer took part: every column from autograd
    else:
        per_call = engine.factors_per_call(len(directions))
    starts = column_starts(params)
    jac = flat.new_zeros(flat.shape[0], sum(p.numel() for p in params))
    first_pass, rows = [], residuals.group_rows()
    count = 0
    for shape in residuals.shapes:
        first_pass.append(count)
        count += shape.columns
    covered: set[int] = set()
    for name, parts in per_call.items():
        for factors in parts:
            layer_params = [p for p in factors.params if id(p) in starts]
            covered.update(id(p) for p in layer_params)
            u = factors.per_sample().to(jac.dtype)
            b = u.shape[0] // len(directions)
            u = u.view(b, len(directions), -1)
            for (start, end), shape, p0 in zip(rows, residuals.shapes, first_pass, strict=True):
                block = u[:, p0 : p0 + shape.columns]
                if b == shape.points:
                    _add_columns(jac[start:end], block.reshape(end - start, -1), factors.params, starts)
                elif bool(block.any()):
                    raise JacobianMismatch(
                        f"layer {name} was called on {b} samples, but the rows of a residual group of "
                        f"{shape.points} points depend on that call: the hooks' rows are per point only"
                    )
    rest = [p for p in params if id(p) not in covered]
    if rest:
        with engine.paused():
            columns = functional_columns(flat, rest)
        _add_columns(jac, columns, rest, starts)
    return jac, rest


def _add_columns(target: Tensor, rows: Tensor, params: Sequence[nn.Parameter], starts: dict[int, int]) -> None:
    """``target[:, columns of p] += rows[:, p's part]`` for each of ``params`` (rows'
    columns: the parameters flattened in that order; parameters not in ``starts`` skipped)."""
    offset = 0
    for p in params:
        n = p.numel()
        start = starts.get(id(p))
        if start is not None:
            target[:, start : start + n] += rows[:, offset : offset + n]
        offset += n


def functional_columns(flat: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """``d flat / d params`` ``[M, sum numel]`` through ``flat``'s graph (kept), by batched
    vector-Jacobian products with blocks of rows of the identity (module doc); a row at a
    time where an operation has no batching rule."""
    m = flat.shape[0]
    width = sum(p.numel() for p in params)
    out = flat.new_zeros(m, width)
    chunk = max(1, min(m, JACOBIAN_CHUNK_ELEMENTS // max(1, width)))
    eye = torch.eye(m, dtype=flat.dtype, device=flat.device)
    for i0 in range(0, m, chunk):
        i1 = min(m, i0 + chunk)
        try:
            grads = torch.autograd.grad(
                flat, list(params), grad_outputs=eye[i0:i1], is_grads_batched=True, retain_graph=True, allow_unused=True
            )
        except RuntimeError:  # an operation without a batching rule: one row at a time
            grads = _row_by_row(flat, params, eye[i0:i1])
        offset = 0
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                out[i0:i1, offset : offset + p.numel()] = g.reshape(i1 - i0, -1)
            offset += p.numel()
    return out


def _row_by_row(flat: Tensor, params: Sequence[nn.Parameter], rows: Tensor) -> list[Tensor | None]:
    per_row = [
        torch.autograd.grad(flat, list(params), grad_outputs=row, retain_graph=True, allow_unused=True) for row in rows
    ]
    out: list[Tensor | None] = []
    for k, p in enumerate(params):
        parts = [r[k] for r in per_row]
        if all(g is None for g in parts):
            out.append(None)
        else:
            out.append(torch.stack([torch.zeros_like(p) if g is None else g for g in parts]))
    return out


class _ClosureModule(nn.Module):
    """``forward()`` runs the closure and returns its rows flattened: ``functional_call`` on
    this wrapper swaps the parameters of ``model`` (the module the closure uses)."""

    def __init__(self, model: nn.Module, closure: Callable[[], Any]) -> None:
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self) -> Tensor:
        value = self.closure()
        groups = [value] if isinstance(value, Tensor) else list(value)
        return torch.cat([r.reshape(-1) for r in groups])


def jacrev_jacobian(
    model: nn.Module, closure: Callable[[], Any], params: Sequence[nn.Parameter]
) -> tuple[Tensor, Tensor]:
    """``(J [M, p], r [M])`` by ``torch.func.jacrev`` of ``functional_call`` through another
    call of the closure, in blocks of at most :data:`JACOBIAN_CHUNK_ELEMENTS` entries.
    Raises RuntimeError for a closure that torch.func cannot run (``requires_grad_``,
    ``torch.autograd.grad`` inside)."""
    names = {id(p): name for name, p in model.named_parameters()}
    wrapper = _ClosureModule(model, closure)
    theta = {f"model.{names[id(p)]}": p.detach() for p in params}
    width = sum(p.numel() for p in params)
    chunk = max(1, JACOBIAN_CHUNK_ELEMENTS // max(1, width))

    def rows(th: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        r = functional_call(wrapper, th, ())
        return r, r.detach()

    jac, r = torch.func.jacrev(rows, has_aux=True, chunk_size=chunk)(theta)
    return torch.cat([jac[name].reshape(r.shape[0], -1) for name in theta], dim=1), r


def functional_jacobian(
    engine: CaptureEngine,
    residuals: Residuals,
    params: Sequence[nn.Parameter],
    closure: Callable[[], Any] | None = None,
) -> tuple[Tensor, bool]:
    """``(J [M, p], whether jacrev gave it)``, hooks paused: :func:`jacrev_jacobian` when
    ``closure`` is given and torch.func can run it (much faster than batched
    vector-Jacobian products through a graph of derivatives), else every column by
    :func:`functional_columns` through the step's own graph."""
    with engine.paused():
        if closure is not None:
            try:
                jac, r = jacrev_jacobian(engine.model, closure, params)
            except RuntimeError:
                pass
            else:  # (a closure that is not deterministic: J of the step's own rows below)
                if r.shape == residuals.flat.shape and same_rows(r, residuals.flat.detach()):
                    return jac, True
            finally:
                engine.clear()  # (the forward hooks record under torch.func too)
        return functional_columns(residuals.flat, params), False


def same_rows(first: Tensor, second: Tensor) -> bool:
    """Whether two calls of the closure gave the same rows (to ``sqrt(eps)`` of their size)."""
    tol = mismatch_tolerance(first.dtype) * max(float(second.abs().max()), 1.0)
    return bool((first - second).abs().max() <= tol)


def loss_gradient(engine: CaptureEngine, residuals: Residuals, params: Sequence[nn.Parameter]) -> Tensor:
    """``grad L = (d r / d theta)^T r`` ``[p]`` by one ordinary backward pass of ``L``
    through the closure's graph (kept; hooks paused): the reference of the check."""
    flat = residuals.flat
    with engine.paused():
        grads = torch.autograd.grad(
            flat, list(params), grad_outputs=flat.detach(), retain_graph=True, allow_unused=True
        )
    parts = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    return torch.cat(parts)


def mismatch_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of :func:`gradient_mismatch`: ``sqrt(eps)`` of ``dtype``
    (1.5e-8 in float64, 3.5e-4 in float32)."""
    return math.sqrt(torch.finfo(dtype).eps)


def gradient_mismatch(jac: Tensor, r: Tensor, gradient: Tensor) -> str | None:
    """Why ``J^T r`` is not ``grad L`` (None when it is, to within
    :func:`mismatch_tolerance` relative to ``|| |J|^T |r| ||``, the size of the terms
    summed: rounding cannot exceed it, a missing or wrong term does)."""
    r = r.detach()
    product = r @ jac
    error = float(torch.linalg.vector_norm(product - gradient))
    scale = float(torch.linalg.vector_norm(r.abs() @ jac.abs()))
    tol = mismatch_tolerance(jac.dtype)
    if math.isfinite(error) and error <= tol * max(scale, torch.finfo(jac.dtype).tiny):
        return None
    relative = error / max(float(torch.linalg.vector_norm(gradient)), torch.finfo(jac.dtype).tiny)
    return (
        f"J^T r differs from autograd's gradient of L by {relative:.2e} (relative; tolerance {tol:.1e} of the terms' "
        "size): a residual row depends on more than its own point's calls of the hooked layers (e.g. derivatives "
        "taken with torch.autograd.grad, or a parameter used outside its module)"
    )
