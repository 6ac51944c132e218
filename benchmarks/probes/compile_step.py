"""Probe: does ``torch.compile`` speed up the per-step linear algebra? Not on CPU: no flag.

Conclusion (benchmarks/notes.md, "torch.compile of the per-step linear algebra";
``benchmarks/results/compile_step.{json,png}``): on CPU no piece gains more than 5% of a
whole step. The break-free pieces are GEMMs, ``convolution_backward`` and LAPACK calls that
inductor leaves to aten (compiled = eager within noise); the pieces as the library runs
them break into 13-17 graphs per FNGD/SENG step at the host syncs of the finiteness checks
and recompile on every new damping value; a compiled step costs 20-30 s of start-up plus
recompiles. CUDA was not measured (``--device cuda`` is accepted, untested).

Two questions, on the ``digits`` MLP 64-256-256-10 and the ``mnist`` CNN, batch 128 of
the tasks' own training data, one thread by default:

(a) **Pieces.** The linear algebra one step runs after the backward pass, called through
    the library's own functions on tensors captured from real FNGD backward passes (four
    batches, cycled, so the compiled code sees new data every call, as in training):

    - ``gram``: ``K_l = U_l U_l^T`` of every layer (``SharedWeightFactors.gram``: for a
      Linear layer ``(Z Z^T) * (X X^T + 1)``; for a convolution, its explicit per-sample
      rows ``U_l`` and their Gram);
    - ``rmatvec``: ``U_l^T a`` of every layer (FNGD's direction, ``LayerFactors.rmatvec``);
    - ``matvec``: ``U_l g`` of every layer (SENG's right-hand side, ``LayerFactors.matvec``);
    - ``solve``: the damped Cholesky solve ``(K_l + d I)^{-1} r`` of every layer as
      :func:`gramopt.linalg.dense.solve_damped_psd` runs it (its checks included);
    - ``fngd_estimate``: FNGD's estimation algebra, Gram -> coefficients
      (:func:`gramopt.optim.fngd.fngd_coefficients`, Eq. 9 and 14 of Ou et al.,
      "Inverse-Free Fast Natural Gradient Descent Method for Deep Learning",
      arXiv:2403.03473, 2024) -> ``U_l^T (M v_l)``;
    - ``seng_direction``: SENG's exact explicit-layer direction ``d = (g - U^T beta) / lam``,
      ``beta = (U U^T + b lam I)^{-1} U g`` (Eq. 8-9 of Yang et al., "Sketchy Empirical
      Natural Gradient Methods for Deep Learning", arXiv:2006.05924, 2020), through
      ``gram``, ``matvec``, ``solve_damped_psd`` and ``rmatvec``.

    - ``solve_core`` and ``fngd_core``: the same algebra as ``solve`` and ``fngd_estimate``
      written without anything that breaks a graph (no ``float()`` of a tensor, no
      checks, no fallbacks, no timers: the damping a 0-dim tensor): what compiling could
      give at best if the library were restructured for it (not what it runs).

    Each piece runs eagerly and compiled (``torch.compile(fn, dynamic=False, mode=...)``
    for each mode of ``--modes``); ``torch._dynamo.explain`` counts its graphs and graph
    breaks.

(b) **Whole steps.** ``optimizer.step()`` of SGD-momentum, FNGD (sharing phase), SENG
    (``curvature_every=1``, defaults) and GGN (exact, mse) eagerly and wrapped in
    ``torch.compile`` (the forward and the method's backward pass stay eager: the capture
    hooks run there); ``explain`` counts graph breaks of one step.

Compile (start-up) time is the first call's time minus the median eager call (``compile_s``),
in a fresh, empty inductor cache unless ``--warm-cache``; the second call and the next
:data:`SETTLE_CALLS` calls are timed too, with the graphs compiled in each (recompiles on new
float values show there). The modes compile one after the other in one process, so only the
first compile of a process pays inductor's C++ warm-up. Steady-state times come from
:func:`bench_common.interleaved` (all variants of a model in turns, in one process, rounds
in a rotating order), the baseline being one whole eager SGD-momentum training step of the
same model (forward, backward, step): every figure is reported as ms and as a ratio to that
step, wall and thread CPU. ``recompiles`` counts the graphs dynamo compiled during the timed
phase (0 when the guards held on new data).

    PYTHONPATH=src python benchmarks/probes/compile_step.py   # writes benchmarks/results/compile_step.{json,png}

``--quick`` compiles with dynamo's ``eager`` backend (graphs, breaks and guards, no code
generation) at batch 16, one mode, one round.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from gramopt.capture.conv import ConvFactors
from gramopt.capture.factors import LayerFactors
from gramopt.capture.shared_weight import SharedWeightFactors
from gramopt.linalg.dense import solve_damped_psd
from gramopt.optim.fngd import fngd_coefficients
from gramopt.training.registry import training_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import (  # noqa: E402
    arguments,
    build_method,
    environment,
    interleaved,
    load_model,
    pyplot,
    ratio_spread,
    regression_target,
    write_results,
)

MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
PIECES = ("gram", "rmatvec", "matvec", "solve", "solve_core", "fngd_estimate", "fngd_core", "seng_direction")
METHODS = ("fngd-share", "seng-every1", "ggn-mse")
#: FNGD's relative damping and SENG's lam for the pieces (timing only).
DAMPING = 1e-3


# -- captured tensors -------------------------------------------------------------------
Layer = tuple[nn.Module, list[nn.Parameter], type]


def capture(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], count: int
) -> tuple[list[Layer], list[list[Tensor]]]:
    """The layers FNGD preconditions and, per batch, their factors' tensors flattened
    ``[X_1, Z_1, X_2, Z_2, ...]`` (a Linear layer: X ``[b, 1, d_in]``, Z ``[b, 1, 1, d_out]``;
    a convolution: its input ``[b, C, H, W]`` and output-gradients ``[b, 1, C', H', W']``)."""
    opt, _ = build_method("fngd-estimate", model)
    layers: list[Layer] = []
    data = []
    for x, y in batches[:count]:
        opt.zero_grad(set_to_none=True)
        opt.backward(model(x), y)
        factors = opt.engine.factors()
        if not layers:
            for f in factors.values():
                if type(f) not in (SharedWeightFactors, ConvFactors):
                    raise TypeError(f"unexpected factor type {type(f).__name__}")
                layers = layers + [(f.module, f.params, type(f))]
        data.append([t.detach().clone() for f in factors.values() for t in f.tensors()])
        opt.engine.clear()
    opt.zero_grad(set_to_none=True)
    return layers, data


def rebuild(layers: list[Layer], tensors: list[Tensor]) -> list[LayerFactors]:
    """The factor objects of ``layers`` from their flattened tensors (inside the compiled
    functions too, so that only tensors cross the compiled boundary)."""
    out: list[LayerFactors] = []
    for i, (module, params, cls) in enumerate(layers):
        x, z = tensors[2 * i], tensors[2 * i + 1]
        if cls is ConvFactors:
            out.append(ConvFactors(module, params, [x], [z]))
        else:
            out.append(SharedWeightFactors(module, params, module.weight, module.bias, x, z))
    return out


def cholesky_solve(gram: Tensor, rhs: Tensor, shift: Tensor) -> Tensor:
    """``(gram + shift I)^{-1} rhs`` by one Cholesky factorization, no checks (``gram``
    ``[n, n]``, ``rhs`` ``[n, m]``, ``shift`` a 0-dim tensor): the happy path of
    :func:`~gramopt.linalg.dense.solve_damped_psd`."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, _ = torch.linalg.cholesky_ex(gram + shift * eye)
    return torch.cholesky_solve(rhs, chol)


def piece_functions(layers: list[Layer]) -> dict[str, Callable[..., list[Tensor]]]:
    """name -> fn(*inputs) of every piece (inputs: :func:`piece_inputs`)."""
    n_layers = len(layers)

    def gram(*ts: Tensor) -> list[Tensor]:
        return [f.gram() for f in rebuild(layers, list(ts))]

    def rmatvec(*ts: Tensor) -> list[Tensor]:
        factors = rebuild(layers, list(ts[: 2 * n_layers]))
        coeffs = ts[2 * n_layers :]
        return [d for f, a in zip(factors, coeffs) for d in f.rmatvec(a)]  # noqa: B905 (traced by dynamo)

    def matvec(*ts: Tensor) -> list[Tensor]:
        factors = rebuild(layers, list(ts[: 2 * n_layers]))
        return [f.matvec(list(f.params)) for f in factors]

    def solve(*grams: Tensor) -> list[Tensor]:
        out = []
        for k in grams:
            rhs = torch.ones(k.shape[0], dtype=k.dtype, device=k.device)
            out.append(solve_damped_psd(k, rhs, DAMPING * k.shape[0])[0])
        return out

    def solve_core(*grams: Tensor) -> list[Tensor]:
        out = []
        for k in grams:
            rhs = torch.ones(k.shape[0], 1, dtype=k.dtype, device=k.device)
            out.append(cholesky_solve(k, rhs, torch.tensor(DAMPING * k.shape[0], dtype=k.dtype, device=k.device)))
        return out

    def fngd_core(*ts: Tensor) -> list[Tensor]:
        out = []
        for f in rebuild(layers, list(ts)):
            m = f.num_rows
            gram = f.gram() * m**2
            lam = DAMPING * torch.linalg.matrix_norm(gram)  # Eq. 14, kept a tensor
            v = cholesky_solve(gram, lam.expand(m, 1), lam * m).squeeze(1)
            out.extend(f.rmatvec(v * m))
        return out

    def fngd_estimate(*ts: Tensor) -> list[Tensor]:
        out = []
        for f in rebuild(layers, list(ts)):
            m = f.num_rows
            v = fngd_coefficients(f.gram() * m**2, DAMPING)
            out.extend(f.rmatvec(v * m))
        return out

    def seng_direction(*ts: Tensor) -> list[Tensor]:
        factors = rebuild(layers, list(ts[: 2 * n_layers]))
        grads = ts[2 * n_layers :]
        out, i = [], 0
        for f in factors:
            g = list(grads[i : i + len(f.params)])
            i += len(f.params)
            beta, _ = solve_damped_psd(f.gram(), f.matvec(g), f.num_rows * DAMPING)
            out.extend((gj - uj) / DAMPING for gj, uj in zip(g, f.rmatvec(beta)))  # noqa: B905 (traced)
        return out

    return {
        "gram": gram, "rmatvec": rmatvec, "matvec": matvec, "solve": solve, "solve_core": solve_core,
        "fngd_estimate": fngd_estimate, "fngd_core": fngd_core, "seng_direction": seng_direction,
    }


def piece_inputs(layers: list[Layer], data: list[list[Tensor]]) -> dict[str, list[list[Tensor]]]:
    """Per piece, per captured batch, its positional inputs."""
    out: dict[str, list[list[Tensor]]] = {p: [] for p in PIECES}
    gen = torch.Generator().manual_seed(0)
    for ts in data:
        factors = rebuild(layers, ts)
        coeffs = [torch.randn(f.num_rows, generator=gen).to(ts[0].device) for f in factors]
        grads = [torch.randn(p.shape, generator=gen).to(ts[0].device) for f in factors for p in f.params]
        out["gram"].append(ts)
        out["rmatvec"].append(ts + coeffs)
        out["matvec"].append(ts)
        out["solve"].append([f.gram().detach() * f.num_rows**2 for f in factors])
        out["solve_core"].append(out["solve"][-1])
        out["fngd_estimate"].append(ts)
        out["fngd_core"].append(ts)
        out["seng_direction"].append(ts + grads)
    return out


# -- compiling and timing --------------------------------------------------------------
def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def where(record: object) -> str:
    """``file:line`` (repository-relative where possible) of a graph break's innermost frame."""
    stack = getattr(record, "user_stack", None) or []
    if not stack:
        return "?"
    frame = stack[-1]
    return f"{frame.filename.split('/src/')[-1].split('site-packages/')[-1]}:{frame.lineno}"


def explain(fn: Callable, *args: object) -> dict:
    """Graphs, graph breaks and their reasons (deduplicated) of one call of ``fn``."""
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(fn)(*args)
    except Exception as exc:  # noqa: BLE001 (recorded, not hidden)
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}
    reasons = sorted({f"{str(b.reason).splitlines()[0][:160]} @ {where(b)}" for b in ex.break_reasons})
    return {
        "graphs": ex.graph_count,
        "graph_breaks": ex.graph_break_count,
        "ops": ex.op_count,
        "break_reasons": reasons,
    }


#: Calls after the first two before timing: recompiles (new float values, guards) happen
#: there, up to dynamo's recompile limit (8 per frame), not in the timed phase.
SETTLE_CALLS = 10


def start_up(call: Callable[[], object], eager_s: float) -> dict:
    """Time the first two calls of a compiled ``call``, then :data:`SETTLE_CALLS` more:
    compile time (first call less the eager call), graphs compiled in each phase."""
    before = unique_graphs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        graphs_first = unique_graphs() - before
        t0 = time.perf_counter()
        call()
        second = time.perf_counter() - t0
        mid = unique_graphs()
        t0 = time.perf_counter()
        for _ in range(SETTLE_CALLS):
            call()
        settle = time.perf_counter() - t0
    return {
        "first_call_s": first, "second_call_s": second, "compile_s": max(0.0, first - eager_s),
        "next_calls_s": settle, "graphs_first_call": graphs_first, "graphs_second_call": mid - before - graphs_first,
        f"graphs_next_{SETTLE_CALLS}_calls": unique_graphs() - mid,
    }


def compile_fn(
    fn: Callable, mode: str, inputs: list[list[Tensor]], eager_s: float, backend: str = "inductor"
) -> tuple[Callable | None, dict]:
    """``torch.compile(fn, dynamic=False, mode=mode, backend=backend)`` and its
    :func:`start_up` on the captured ``inputs`` (cycled); on failure (None, the error)."""
    compiled = torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode, backend=backend)
    try:
        info = start_up(cycler(compiled, inputs), eager_s)
    except Exception as exc:  # noqa: BLE001 (recorded, not hidden)
        traceback.print_exc(limit=3)
        return None, {"error": f"{type(exc).__name__}: {exc}"[:400]}
    return compiled, info


def median_call(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cycler(fn: Callable, inputs: list[list[Tensor]]) -> Callable[[], object]:
    """A no-argument call of ``fn`` on the next captured batch's inputs."""
    state = {"i": 0}

    def one() -> object:
        args = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(*args)

    return one


def max_relative_error(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b, strict=True))


# -- the benchmark per model ---------------------------------------------------------------
def on_device(model: nn.Module, loss: str, batches: list, device: torch.device) -> tuple[nn.Module, str, list]:
    return model.to(device), loss, [(x.to(device), y.to(device)) for x, y in batches]


def sgd_step(model: nn.Module, loss: str, batches: list) -> Callable[[], object]:
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    return cycler(lambda x, y: training_step(opt, m, loss, x, y), [list(b) for b in batches])


def bench_pieces(
    name: str,
    modes: list[str],
    rounds: int,
    seconds: float,
    device: torch.device,
    batch: int = 128,
    backend: str = "inductor",
    compiled_pieces: tuple[str, ...] = PIECES,
) -> dict:
    """Every piece eagerly; those of ``compiled_pieces`` also explained and compiled in each mode."""
    model, loss, batches = on_device(*load_model(name, batch=batch), device)
    layers, data = capture(copy.deepcopy(model), batches, 4)
    fns = piece_functions(layers)
    inputs = piece_inputs(layers, data)
    steps: dict[str, Callable[[], object]] = {"sgd": sgd_step(model, loss, batches)}
    result: dict = {
        "layers": [f"{m.__class__.__name__}{tuple(p.shape for p in ps)[0]}" for m, ps, _ in layers],
        "pieces": {},
    }
    for piece in PIECES:
        fn, args = fns[piece], inputs[piece]
        eager = cycler(fn, args)
        eager_s = median_call(eager)
        steps[f"{piece}:eager"] = eager
        if piece not in compiled_pieces:
            continue
        entry: dict = {"explain": explain(fn, *args[0]), "compiled": {}}
        for mode in modes:
            torch._dynamo.reset()
            compiled, info = compile_fn(fn, mode, args, eager_s, backend)
            if compiled is not None:
                info["max_relative_error"] = max_relative_error(compiled(*args[2]), fn(*args[2]))
                steps[f"{piece}:{mode}"] = cycler(compiled, args)
            entry["compiled"][mode] = info
            print(f"{name} {piece} {mode}: {info}", flush=True)
        result["pieces"][piece] = entry
    check = inputs["fngd_estimate"][0]
    result["fngd_core_vs_fngd_estimate_max_relative_error"] = max_relative_error(
        fns["fngd_core"](*check), fns["fngd_estimate"](*check)
    )
    before = unique_graphs()
    wall, cpu, inner = interleaved(steps, rounds, seconds, device, warmup=3)
    result["recompiles_while_timed"] = unique_graphs() - before
    result["steps_per_turn"] = inner
    result["timing"] = summarize(wall, cpu)
    return result


def bench_steps(
    name: str,
    rounds: int,
    seconds: float,
    device: torch.device,
    batch: int = 128,
    backend: str = "inductor",
    methods: tuple[str, ...] = METHODS,
) -> dict:
    model, task_loss, batches = on_device(*load_model(name, batch=batch), device)
    steps: dict[str, Callable[[], object]] = {}
    result: dict = {"methods": {}}
    for method in ("sgd", *methods):
        for compiled in (False, True):
            m = copy.deepcopy(model)
            opt, loss = build_method(method, m)
            loss = loss or task_loss
            data = [[x, regression_target(y, loss, 10, False)] for x, y in batches]
            key = f"{method}:{'compiled' if compiled else 'eager'}"
            call = cycler(lambda x, y, opt=opt, m=m, loss=loss: training_step(opt, m, loss, x, y), data)
            if not compiled:
                steps[key] = call
                continue
            entry: dict = {}
            # explain one step on its own copy (explain runs the step)
            m2 = copy.deepcopy(model)
            opt2, _ = build_method(method, m2)
            x, y = data[0]
            opt2.zero_grad(set_to_none=True)
            if hasattr(opt2, "backward"):
                opt2.backward(m2(x), y)
            else:
                nn.functional.cross_entropy(m2(x), y).backward()
            entry["explain"] = explain(opt2.step)
            eager_s = median_call(call, 3)
            torch._dynamo.reset()
            opt.step = torch.compile(opt.step, dynamic=False, backend=backend)  # type: ignore[method-assign]
            try:
                entry.update(start_up(call, eager_s))
                steps[key] = call
            except Exception as exc:  # noqa: BLE001 (recorded, not hidden)
                traceback.print_exc(limit=3)
                entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
            result["methods"][method] = entry
            print(f"{name} step {method}: {entry}", flush=True)
    before = unique_graphs()
    wall, cpu, inner = interleaved(steps, rounds, seconds, device, baseline="sgd:eager", warmup=3)
    result["recompiles_while_timed"] = unique_graphs() - before
    result["steps_per_turn"] = inner
    result["timing"] = summarize(wall, cpu, baseline="sgd:eager")
    return result


def summarize(wall: dict[str, list[float]], cpu: dict[str, list[float]], baseline: str = "sgd") -> dict:
    """Per variant: median ms (wall, thread CPU) and the median, min, max per-round ratio
    to the baseline (one eager SGD-momentum training step)."""
    return {
        key: {
            "ms_wall": 1e3 * statistics.median(wall[key]),
            "ms_cpu": 1e3 * statistics.median(cpu[key]),
            "ratio_wall": ratio_spread(wall[key], wall[baseline]),
            "ratio_cpu": ratio_spread(cpu[key], cpu[baseline]),
        }
        for key in wall
    }


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 3.8 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        r = results["models"][name]
        for col, (part, keys) in enumerate((("pieces", PIECES), ("steps", ("sgd",) + METHODS))):
            ax = axes[row][col]
            if part not in r:
                ax.set_visible(False)
                continue
            timing = r[part]["timing"]
            variants = ["eager"] + (results["settings"]["modes"] if part == "pieces" else ["compiled"])
            width = 0.8 / len(variants)
            for i, v in enumerate(variants):
                values = [timing.get(f"{k}:{v}", {}).get("ratio_cpu", {}).get("median", float("nan")) for k in keys]
                ax.bar([j + (i - (len(variants) - 1) / 2) * width for j in range(len(keys))], values, width, label=v)
            ax.set_xticks(range(len(keys)), keys, rotation=20, fontsize=8)
            ax.set_ylabel("time / eager SGD step (thread CPU)")
            ax.set_title(
                f"{name}: {'per-step algebra pieces' if part == 'pieces' else 'whole training step, step() compiled'}",
                fontsize=9,
            )
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--models", nargs="+", default=["mlp", "mnist"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds-per-turn", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-steps", action="store_true", help="only the pieces (a)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pieces", nargs="+", default=list(PIECES), help="the pieces to compile (all run eagerly)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="the methods whose step() to compile")
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile's backend (other than inductor: --modes default)"
    )
    parser.add_argument(
        "--warm-cache", action="store_true",
        help="keep inductor's on-disk cache (default: a fresh empty one, so compile_s is a cold start)",
    )
    parser.add_argument(
        "--append", action="store_true",
        help="add the models to the results already in --out.json (one model per process keeps each run short)",
    )
    args = parser.parse_args()
    if args.quick:  # dynamo's eager backend on one piece and one method's step, batch 16, one round
        args.models, args.modes, args.rounds, args.seconds_per_turn, args.batch = ["mlp"], ["default"], 1, 0.0, 16
        args.backend, args.pieces, args.methods = "eager", ["gram"], ["fngd-share"]
    torch.set_num_threads(args.threads)
    fresh_cache = None
    if not args.warm_cache:  # read when inductor first compiles
        fresh_cache = tempfile.mkdtemp(prefix="compile_step_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache
    device = torch.device(args.device)
    results = {
        "benchmark": "torch.compile of the per-step linear algebra and of optimizer.step(), eager vs compiled, batch "
            "128",
        "environment": environment(device),
        "settings": vars(args),
        "models": {},
    }
    out = args.out / "compile_step"
    if args.append and out.with_suffix(".json").exists():
        earlier = json.loads(out.with_suffix(".json").read_text())
        if earlier["settings"]["modes"] != args.modes:
            raise SystemExit(
                f"--append: {out}.json was run with modes {earlier['settings']['modes']}, not {args.modes}"
            )
        results["models"] = earlier["models"]
        results["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {"environment": earlier["environment"], "settings": earlier["settings"]}
        ]
    for name in args.models:
        timing = (args.rounds, args.seconds_per_turn, device, args.batch, args.backend)
        entry = {"pieces": bench_pieces(name, args.modes, *timing, tuple(args.pieces))}
        if not args.skip_steps:
            entry["steps"] = bench_steps(name, *timing, tuple(args.methods))
        results["models"][name] = entry
        for part in ("pieces", "steps"):
            for key, t in entry.get(part, {}).get("timing", {}).items():
                print(
                    f"{name} {part} {key:40s} {t['ms_cpu']:8.3f} ms cpu  {t['ratio_cpu']['median']:.3f}x sgd",
                    flush=True,
                )
    write_results(results, out, plot)
    if fresh_cache is not None:
        shutil.rmtree(fresh_cache, ignore_errors=True)


if __name__ == "__main__":
    main()
