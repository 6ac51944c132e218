"""How far each method's step is from the dense float64 reference on models with tied
parameters (tests/tied_cases.py): Linear-Linear, Embedding-Linear (GPT weight tying),
Conv-Conv, and a module called twice. Not a timing benchmark: the relative error
``||delta - delta_ref|| / ||delta_ref||`` of one step per method and case, and, with
``--cost``, the seconds of a tied block's Gram against its members' Grams alone.

    python benchmarks/tied_parameters.py [--tag before] [--cost]

writes benchmarks/results/tied_parameters[-TAG].json.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import torch

import gramopt
from bench_common import arguments, write_json
from gramopt.losses import get_loss

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import tied_cases as tc  # noqa: E402
from reference import params_vector  # noqa: E402

LR, DAMPING, SEED, SAMPLES = 0.5, 0.3, 5, 2


def _positions(case: tc.TiedCase, loss: str) -> int:
    with torch.no_grad():
        f = case.model(case.x)
    return f[0].numel() // f.shape[1] if loss == "cross_entropy" else 1


def _ggn(case: tc.TiedCase, loss: str, curvature: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    model = copy.deepcopy(case.model)
    y = case.y_mse if loss == "mse" else case.y_ce
    with torch.no_grad():
        f = model(case.x)
    kwargs: dict = {}
    if curvature == "exact":
        h = tc.exact_curvature(f, loss)
    elif curvature == "top":
        if f.dim() > 2:
            kwargs["samples"] = f.shape[1]  # all classes: the exact curvature
            h = tc.exact_curvature(f, loss)
        else:
            kwargs["samples"] = SAMPLES
            h = tc.top_curvature(f, y, SAMPLES)
    else:
        kwargs.update(samples=SAMPLES, seed=SEED)
        generator = torch.Generator().manual_seed(SEED * 1_000_003)
        directions = get_loss(loss).sampled_rows(f, y, SAMPLES, generator)[:-1]
        h = tc.column_curvature(directions)
    e = tc.output_gradient(f, y, loss)
    damping = DAMPING * _positions(case, loss)
    expected = tc.ggn_step(model, case.x, h, e, LR, damping)
    before = params_vector(model)
    opt = gramopt.GGN(model, lr=LR, damping=DAMPING, loss=loss, curvature=curvature, damping_adaptation=None, **kwargs)
    opt.backward(model(case.x), y)
    opt.step()
    return params_vector(model) - before, expected


def _seng(case: tc.TiedCase, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = copy.deepcopy(case.model)
    y = case.y_mse if loss == "mse" else case.y_ce
    blocks = [[dict(model.named_parameters())[n] for n in _names(case, block)] for block in case.blocks]
    expected = tc.as_vector(model, tc.seng_step(model, case.x, y, loss, blocks, LR, DAMPING))
    before = params_vector(model)
    opt = gramopt.SENG(model, lr=LR, damping=DAMPING, loss=loss)
    opt.backward(model(case.x), y)
    opt.step()
    return params_vector(model) - before, expected


def _fngd(case: tc.TiedCase, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = copy.deepcopy(case.model)
    y = case.y_mse if loss == "mse" else case.y_ce
    blocks = [[dict(model.named_parameters())[n] for n in _names(case, block)] for block in case.blocks]
    expected, _ = tc.fngd_step(model, case.x, y, loss, blocks, LR, 1e-2)
    before = params_vector(model)
    opt = gramopt.FNGD(model, lr=LR, damping=1e-2, loss=loss, coefficient_steps=None)
    opt.backward(model(case.x), y)
    opt.step()
    return params_vector(model) - before, tc.as_vector(model, expected)


def _names(case: tc.TiedCase, block: list) -> list[str]:
    names = {id(p): n for n, p in case.model.named_parameters()}
    return [names[id(p)] for p in block]


def errors() -> dict[str, dict[str, float]]:
    runs = {
        "ggn mse exact": lambda c: _ggn(c, "mse", "exact"),
        "ggn mse sampled": lambda c: _ggn(c, "mse", "sampled"),
        "ggn ce exact": lambda c: _ggn(c, "cross_entropy", "exact"),
        "ggn ce top": lambda c: _ggn(c, "cross_entropy", "top"),
        "ggn ce sampled": lambda c: _ggn(c, "cross_entropy", "sampled"),
        "seng mse": lambda c: _seng(c, "mse"),
        "seng ce": lambda c: _seng(c, "cross_entropy"),
        "fngd mse": lambda c: _fngd(c, "mse"),
        "fngd ce": lambda c: _fngd(c, "cross_entropy"),
    }
    table: dict[str, dict[str, float]] = {}
    for method, run in runs.items():
        table[method] = {}
        for name, build in tc.CASES.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                delta, expected = run(build())
            table[method][name] = float((delta - expected).detach().norm() / expected.detach().norm())
    return table


def gram_cost(rounds: int = 10) -> dict[str, dict[str, float]]:
    """Seconds of a tied block's Gram (its members' Grams and their cross block) against
    the members' Grams alone, and of the cross block by the members' structure
    (:meth:`LayerFactors.cross_gram`) against the generic form from their columns; median
    of ``rounds``, in turns, float32, one thread, one ordinary backward pass (SENG's and
    FNGD's rows)."""
    from gramopt.capture.engine import CaptureEngine  # noqa: PLC0415
    from gramopt.capture.tied import columns_cross_gram  # noqa: PLC0415

    out = {}
    torch.set_num_threads(1)
    setups = {
        "linear-linear 256x256, b=128": (lambda: tc.TiedLinears(256), torch.randn(128, 256)),
        "embedding-linear V=512 d=64, b=32 T=16": (
            lambda: tc.TiedEmbeddingHead(512, 64), torch.randint(0, 512, (32, 16))
        ),
        "conv-conv 16ch 3x3 8x8, b=64": (lambda: tc.TiedConvs(16, 8, 10), torch.randn(64, 16, 8, 8)),
    }
    for name, (build, x) in setups.items():
        torch.manual_seed(0)
        model = build()
        engine = CaptureEngine(model, list(model.parameters()))
        model(x).sum().backward()
        tied = next(f for f in engine.factors().values() if hasattr(f, "members"))
        a, b, shared = next(tied.shared_pairs())
        work = {
            "block": tied.gram,
            "members": lambda t=tied: [m.gram() for m in t.members],
            "cross (structure)": lambda t=tied, a=a, b=b, s=shared: t.cross_block(a, b, s),
            "cross (columns)": lambda t=tied, a=a, b=b, s=shared: columns_cross_gram(t.members[a], t.members[b], s),
        }
        times: dict[str, list[float]] = {k: [] for k in work}
        for _ in range(rounds):
            for key, run in work.items():
                for member in tied.members:  # (what one Gram formed and kept is not reused by the next)
                    member.__dict__.pop("_rows", None)
                    member.__dict__.pop("_input_gram", None)
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        out[name] = {**med, "block / members": med["block"] / med["members"]}
        engine.close()
    return out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--cost", action="store_true")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    result: dict = {"relative_error": errors()}
    torch.set_default_dtype(torch.float32)
    if args.cost or args.quick:  # quick: the errors and one round of the Gram costs
        result["gram_seconds"] = gram_cost(rounds=1 if args.quick else 10)
    for method, row in result["relative_error"].items():
        print(f"{method:18s}", "  ".join(f"{k}={v:.2e}" for k, v in row.items()))
    for name, row in result.get("gram_seconds", {}).items():
        print(name, row)
    suffix = f"-{args.tag}" if args.tag else ""
    write_json(result, args.out / f"tied_parameters{suffix}.json")


if __name__ == "__main__":
    main()
