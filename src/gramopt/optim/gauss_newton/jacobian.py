"""Step 2 of a Gauss-Newton step: the Jacobian ``J = d r / d theta`` ``[M, p]`` of the
residual rows (:mod:`.residuals`), columns in the optimizer's parameter order.

Two ways to the same matrix:

- **hooks** (:func:`hooks_jacobian`): gramopt's capture engine. One backward pass per
  (group g, column c) of group g alone, ``grad_outputs`` one on its column c, down to the
  hooked layers' outputs only: it runs through group g's part of the graph, so each
  forward call of a layer holds the output-gradients of the passes that reach it, and its
  factors give per-sample rows of those passes only (for a forward-Laplacian call, the sum
  over the call's channels, :func:`gramopt.pde.forward_laplacian`), written into J's block
  of group g's rows and the layer's columns. A call with N_g samples gives group g's rows;
  row i of the pass is point i's row. This is exact
  only when residual row i depends on point i's forward call alone (what a plain forward
  or ``forward_laplacian`` gives); :func:`gradient_mismatch` checks it. Parameters that no
  hooked layer covers get their columns from autograd (below).
- **functional** (:func:`functional_jacobian`): without hooks, for any closure, including
  derivatives taken with ``torch.autograd.grad(create_graph=True)``; the first route that
  applies, fastest first:

  1. ``"per-point"`` (:func:`per_point_route`): another call of the closure with per-point
     copies of the Linear layers' parameters (:mod:`.per_point`): where each row depends on
     its own point only (checked), one backward pass per (group, column), as the hooks;
  2. ``"jacrev"`` (:func:`jacrev_jacobian`): ``torch.func.jacrev`` through another call of
     the closure, where torch.func can run it;
  3. ``"rows"`` (:func:`group_columns`): J's rows by vector-Jacobian products through the
     step's own graph, each group through its own part, ``torch.autograd.grad(r, params,
     grad_outputs=E, is_grads_batched=True)`` with E a block of :data:`ROWS_PER_PASS` rows of
     the identity: M products, each through a graph that grows with the points, so for
     per-point residuals about M times a gradient of L. Where J has fewer columns than rows
     (a PDE coefficient, a layer no route covers) its columns come by a double
     vector-Jacobian product instead (:func:`columns_by_double_vjp`), a pass per column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gramopt.capture.engine import CaptureEngine
from gramopt.capture.factors import LayerFactors
from gramopt.errors import CaptureError
from gramopt.optim.gauss_newton.per_point import NotPerPoint, per_point_copies, per_point_jacobian
from gramopt.optim.gauss_newton.residuals import Residuals, evaluate

#: A block of rows of J computed at once by the functional path holds at most this many entries.
JACOBIAN_CHUNK_ELEMENTS = 2**22
#: Rows (or columns) per batched vector-Jacobian product: larger blocks run slower on a CPU,
#: their intermediate tensors (block x graph) no longer fit the caches (benchmarks/notes.md).
ROWS_PER_PASS = 16
#: J's columns come by :func:`columns_by_double_vjp` when fewer than the rows over this
#: (a column's pass goes through a graph of the graph's derivative: dearer than a row's).
COLUMN_PASS_COST = 2


class JacobianMismatch(Exception):
    """The hooks' Jacobian is not the residual's (the reason in the message)."""


def column_starts(params: Sequence[nn.Parameter]) -> dict[int, int]:
    """id(p) -> the first column of p in J (parameters flattened, in order)."""
    out, start = {}, 0
    for p in params:
        out[id(p)] = start
        start += p.numel()
    return out


def group_passes(residuals: Residuals) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """``(outputs, directions, group)``: one pass per (group g, column c), which
    differentiates group g alone (``[N_g, k_g]``) with ``grad_outputs`` one on its column c
    (so it runs through that group's part of the graph only); ``group[j]``: pass j's group."""
    outputs, directions, owner = [], [], []
    for index, (r, shape) in enumerate(zip(residuals.groups, residuals.shapes, strict=True)):
        for c in range(shape.columns):
            d = torch.zeros_like(r)
            d[:, c] = 1
            outputs.append(r)
            directions.append(d)
            owner.append(index)
    return outputs, directions, owner


def hooks_jacobian(
    engine: CaptureEngine, residuals: Residuals, params: Sequence[nn.Parameter]
) -> tuple[Tensor, list[nn.Parameter]]:
    """``(J [M, p], the parameters whose columns came from autograd)`` (module doc).
    Raises :class:`JacobianMismatch` when a layer call of one group's size received a
    gradient from another group's rows (a residual that is not per point)."""
    outputs, directions, owner = group_passes(residuals)
    if engine.has_factors():
        raise JacobianMismatch(
            "the closure ran a backward pass of its own through the hooked layers (torch.autograd.grad): its "
            "residuals are derivatives of the layers' outputs, whose rows the hooks cannot give"
        )
    try:
        engine.backward_passes(outputs, directions, retain_graph=True)
    except CaptureError:
        per_call = {}  # no hooked layer took part: every column from autograd
    else:
        per_call = engine.factors_per_call()
    starts = column_starts(params)
    jac = residuals.flat.new_empty(residuals.rows, sum(p.numel() for p in params))
    blocks = _GroupBlocks(jac, residuals, starts)
    covered: set[int] = set()
    for name, parts in per_call.items():
        for passes, factors in parts:
            covered.update(id(p) for p in factors.params if id(p) in starts)
            b = factors.num_rows // len(passes)
            split = [block.view(b, len(passes), -1) for block in parameter_blocks(factors)]
            for g in sorted({owner[j] for j in passes}):
                mine = [k for k, j in enumerate(passes) if owner[j] == g]  # consecutive (g's passes are)
                shape = residuals.shapes[g]
                if b != shape.points:
                    if any(bool(u[:, mine[0] : mine[-1] + 1].any()) for u in split):
                        raise JacobianMismatch(
                            f"layer {name} was called on {b} samples, but the rows of a residual group of "
                            f"{shape.points} points depend on that call: the hooks' rows are per point only"
                        )
                    continue
                for p, u in zip(factors.params, split, strict=True):
                    if id(p) in starts:  # (autograd runs every pass through the whole of its group's graph)
                        blocks.add(g, p, u[:, mine[0] : mine[-1] + 1])
    blocks.zero_the_rest([p for p in params if id(p) in covered])
    rest = [p for p in params if id(p) not in covered]
    if rest:
        with engine.paused():
            columns = group_columns(residuals, rest)
        offset = 0
        for p in rest:
            jac[:, starts[id(p)] : starts[id(p)] + p.numel()] = columns[:, offset : offset + p.numel()]
            offset += p.numel()
    return jac, rest


class _GroupBlocks:
    """Writes the hooks' rows into J ``[M, p]`` (allocated, not zeroed): block (g, p) is group
    g's rows and parameter p's columns; the first call's rows are copied in, later calls' added
    (a layer called several times for one group), blocks no call reached are zeroed at the end."""

    def __init__(self, jac: Tensor, residuals: Residuals, starts: dict[int, int]) -> None:
        self.jac, self.residuals, self.starts = jac, residuals, starts
        self.rows = residuals.group_rows()
        self.written: set[tuple[int, int]] = set()

    def block(self, g: int, p: nn.Parameter) -> Tensor:
        """J's block (g, p) as ``[N_g, k_g, numel]`` (a view)."""
        (start, end), shape, col = self.rows[g], self.residuals.shapes[g], self.starts[id(p)]
        return self.jac[start:end, col : col + p.numel()].view(shape.points, shape.columns, p.numel())

    def add(self, g: int, p: nn.Parameter, rows: Tensor) -> None:
        """Add ``rows`` ``[N_g, k_g, numel]`` (one call's rows in group g's passes)."""
        target = self.block(g, p)
        if (g, id(p)) in self.written:
            target += rows
        else:
            target.copy_(rows)
            self.written.add((g, id(p)))

    def zero_the_rest(self, params: Sequence[nn.Parameter]) -> None:
        for g in range(len(self.rows)):
            for p in params:
                if (g, id(p)) not in self.written:
                    self.block(g, p).zero_()


def parameter_blocks(factors: LayerFactors) -> list[Tensor]:
    """The factors' rows ``[n, numel]`` per parameter of ``factors.params``: the explicit
    per-parameter blocks where the factors form them (no concatenation), else views of
    :meth:`~gramopt.capture.factors.LayerFactors.per_sample`'s columns."""
    explicit = getattr(factors, "explicit_rows", None)
    if explicit is not None:
        return explicit()
    return list(factors.per_sample().split([p.numel() for p in factors.params], dim=1))


def functional_columns(flat: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """``d flat / d params`` ``[M, sum numel]`` through ``flat``'s graph (kept): by columns
    (:func:`columns_by_double_vjp`) when there are fewer than ``M /`` :data:`COLUMN_PASS_COST`
    of them, else by rows (:func:`rows_by_vjp`)."""
    width = sum(p.numel() for p in params)
    if width * COLUMN_PASS_COST < flat.shape[0]:
        try:
            columns = columns_by_double_vjp(flat, params)
        except RuntimeError:  # an operation without a derivative of its backward
            pass
        else:
            if _agrees_with_a_vjp(columns, flat, params):
                return columns
    return rows_by_vjp(flat, params)


def _agrees_with_a_vjp(jac: Tensor, flat: Tensor, params: Sequence[nn.Parameter]) -> bool:
    """Whether ``u^T jac`` is autograd's ``u^T (d flat / d params)`` for random ``u``
    (to ``sqrt(eps)`` of the terms' size): catches columns a backward that cannot be
    differentiated again (``once_differentiable``) left out silently."""
    generator = torch.Generator(device=flat.device).manual_seed(0)
    u = torch.randn(flat.shape, generator=generator, dtype=flat.dtype, device=flat.device)
    grads = torch.autograd.grad(flat, list(params), grad_outputs=u, retain_graph=True, allow_unused=True)
    parts = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    expected = torch.cat(parts)
    error = float(torch.linalg.vector_norm(u @ jac - expected))
    scale = max(float(torch.linalg.vector_norm(u.abs() @ jac.abs())), float(torch.linalg.vector_norm(expected)))
    return error <= mismatch_tolerance(flat.dtype) * max(scale, torch.finfo(flat.dtype).tiny)


def rows_by_vjp(flat: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """J's rows by batched vector-Jacobian products ``torch.autograd.grad(flat, params,
    grad_outputs=E, is_grads_batched=True)``, E a block of :data:`ROWS_PER_PASS` rows of the
    identity (fewer where J's block would exceed :data:`JACOBIAN_CHUNK_ELEMENTS` entries); a
    row at a time where an operation has no batching rule."""
    m = flat.shape[0]
    width = sum(p.numel() for p in params)
    out = flat.new_zeros(m, width)
    chunk = max(1, min(m, ROWS_PER_PASS, JACOBIAN_CHUNK_ELEMENTS // max(1, width)))
    eye = torch.eye(m, dtype=flat.dtype, device=flat.device)
    for i0 in range(0, m, chunk):
        i1 = min(m, i0 + chunk)
        _write_block(out[i0:i1], params, _batched_grad(flat, list(params), eye[i0:i1]))
    return out


def columns_by_double_vjp(flat: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """J's columns through ``flat``'s graph by the double-vector-Jacobian-product trick:
    ``g(v) = J^T v`` with ``create_graph`` at ``v = 0`` (a function linear in v), then
    ``d g_j / d v = J[:, j]``, a block of columns per batched pass. Costs about one pass
    through the graph per column: for a few columns (a PDE coefficient, a layer the hooks do
    not cover) instead of one per row. RuntimeError where a backward cannot be differentiated
    (:func:`functional_columns` checks the result besides)."""
    m = flat.shape[0]
    width = sum(p.numel() for p in params)
    out = flat.new_zeros(m, width)
    v = torch.zeros_like(flat, requires_grad=True)
    grads = torch.autograd.grad(flat, list(params), grad_outputs=v, create_graph=True, allow_unused=True)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        if g is not None and not g.requires_grad:
            raise RuntimeError("a backward of the graph cannot be differentiated (it detaches its result)")
        if g is not None:  # (None: d flat / d p is zero)
            g = g.reshape(-1)
            eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
            chunk = max(1, min(g.shape[0], ROWS_PER_PASS))
            for j0 in range(0, g.shape[0], chunk):
                j1 = min(g.shape[0], j0 + chunk)
                (columns,) = _batched_grad(g, [v], eye[j0:j1])
                if columns is not None:
                    out[:, offset + j0 : offset + j1] = columns.T
        offset += p.numel()
    return out


def _batched_grad(output: Tensor, inputs: list[Tensor], rows: Tensor) -> list[Tensor | None]:
    """``[d (rows @ output) / d input]`` for each row of ``rows`` (stacked first), the graph kept."""
    try:
        return list(
            torch.autograd.grad(
                output, inputs, grad_outputs=rows, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
        )
    except RuntimeError:  # an operation without a batching rule: one row at a time
        return _row_by_row(output, inputs, rows)


def _write_block(block: Tensor, params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    """Write per-parameter gradients ``[rows, *shape]`` (None: zero) into ``block [rows, sum numel]``."""
    offset = 0
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            block[:, offset : offset + p.numel()] = g.reshape(block.shape[0], -1)
        offset += p.numel()


def _row_by_row(flat: Tensor, params: Sequence[Tensor], rows: Tensor) -> list[Tensor | None]:
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


def group_columns(residuals: Residuals, params: Sequence[nn.Parameter]) -> Tensor:
    """:func:`functional_columns` of each residual group through its own part of the graph
    (rows of one group do not run through the others' operations), stacked: ``[M, sum numel]``."""
    return torch.cat([functional_columns(r.reshape(-1), params) for r in residuals.groups])


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


#: The functional routes, fastest first (module doc); "rows" always applies.
FUNCTIONAL_ROUTES = ("per-point", "jacrev", "rows")


def functional_jacobian(
    engine: CaptureEngine,
    residuals: Residuals,
    params: Sequence[nn.Parameter],
    closure: Callable[[], Any] | None = None,
    routes: Sequence[str] = FUNCTIONAL_ROUTES,
    check: bool = True,
) -> tuple[Tensor, str]:
    """``(J [M, p], the route that gave it)``, hooks paused: the first of ``routes`` that
    applies (``"rows"`` always does; the others need ``closure``, which they call again and
    whose rows must be the step's): ``"per-point"`` (:func:`per_point_route`; ``check``: with
    its random pass), ``"jacrev"`` (:func:`jacrev_jacobian`, where torch.func can run the
    closure), ``"rows"`` (every row by :func:`functional_columns` through the step's own graph)."""
    with engine.paused():
        if closure is not None and "per-point" in routes:
            try:
                return per_point_route(engine.model, closure, residuals, params, check), "per-point"
            except NotPerPoint:
                pass
            finally:
                engine.clear()
        if closure is not None and "jacrev" in routes:
            try:
                jac, r = jacrev_jacobian(engine.model, closure, params)
            except RuntimeError:
                pass
            else:  # (a closure that is not deterministic: J of the step's own rows below)
                if r.shape == residuals.flat.shape and same_rows(r, residuals.flat.detach()):
                    return jac, "jacrev"
            finally:
                engine.clear()  # (the forward hooks record under torch.func too)
        return group_columns(residuals, params), "rows"


def per_point_route(
    model: nn.Module,
    closure: Callable[[], Any],
    residuals: Residuals,
    params: Sequence[nn.Parameter],
    check: bool = True,
) -> Tensor:
    """J ``[M, p]`` by per-point copies of the Linear layers' parameters through another call
    of the closure (:mod:`.per_point`, checked there when ``check``); the columns of parameters that no Linear
    call covers by :func:`functional_columns` through the step's own graph. Raises
    :class:`~.per_point.NotPerPoint` where the route does not apply (the reason in the message),
    also for a closure whose rows differ from the step's."""
    with per_point_copies(model, params) as record:
        try:
            again = evaluate(closure, residuals.flat.dtype, residuals.flat.device)
        except (RuntimeError, ValueError) as error:
            raise NotPerPoint(f"the closure failed with per-point copies: {error}") from error
    if again.shapes != residuals.shapes or not same_rows(again.flat.detach(), residuals.flat.detach()):
        raise NotPerPoint("the closure's rows differ from the step's (a closure that is not deterministic)")
    starts = column_starts(params)
    jac, covered = per_point_jacobian(record, again, params, starts, check)
    del again  # (its graph)
    rest = [p for p in params if id(p) not in covered]
    if rest:
        columns = group_columns(residuals, rest)
        offset = 0
        for p in rest:
            jac[:, starts[id(p)] : starts[id(p)] + p.numel()] = columns[:, offset : offset + p.numel()]
            offset += p.numel()
    return jac


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
