"""How what a handler saves travels (``LayerHandler.saved_tensors`` / ``restore_saved``):
``distributed="exact"`` gathers it from every rank, gradient accumulation concatenates it
over micro-batches.

- every registered handler (and the attention in-projection, which saves query, key and
  value): ``"exact"`` over two ranks that hold the same batch, run in one process (every
  gathered tensor is its rows twice), gives the single-process step on the doubled batch
  ``[x; x]``, for GGN, SENG and FNGD (float64);
- a user handler whose ``save`` keeps a tuple with a batch-second tensor travels once it
  defines the two hooks, and is refused by name (nothing changed) while it does not.

The real thing, 2 gloo ranks with different batches, is in test_distributed.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gramopt
from gramopt.capture.registry import _REGISTRY
from gramopt.errors import CaptureError


class TwinRanks:
    """``distributed="exact"`` over two ranks holding the same batch, in one process: each
    gathered tensor is its rows twice, those marked ``scaled`` (gradients of a rank's mean
    loss) times b_r / B = 1/2 (:meth:`gramopt.distributed.DataParallel.gather_rows`); the
    ranks' mean ``.grad`` is their own."""

    policy = "exact"
    nested = False

    def agreement(self) -> Any:
        return nullcontext()

    def gather_rows(self, tensors: list[Tensor], scaled: list[bool], layout: str = "") -> list[Tensor]:
        return [torch.cat([t * 0.5, t * 0.5]) if s else torch.cat([t, t]) for t, s in zip(tensors, scaled, strict=True)]

    def synchronize_gradients(self, params: list[Tensor], samples: int) -> None:
        pass


class Vision(nn.Module):
    """Conv2d (structured factors), GroupNorm, a grouped Conv2d and a ConvTranspose2d
    (explicit rows), BatchNorm2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.group_norm = nn.GroupNorm(2, 4)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.batch_norm = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.group_norm(self.conv(x)))
        h = torch.tanh(self.batch_norm(self.grouped(h)))
        return self.head(self.up(h).flatten(1))

    @staticmethod
    def inputs(b: int, generator: torch.Generator) -> Tensor:
        return torch.randn(b, 2, 5, 5, generator=generator, dtype=torch.float64)


class Sequence(nn.Module):
    """Embedding, LayerNorm, packed self-attention (saves one tensor), cross-attention with
    ``kdim = vdim = 3`` (saves query, key and value), RMSNorm, Linear on ``[b, T, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.self_attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.context = nn.Linear(4, 3)
        self.cross_attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=3, batch_first=True)
        self.rms = nn.RMSNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(self.embed(tokens))
        h = h + self.self_attn(h, h, h, need_weights=False)[0]
        c = torch.tanh(self.context(h[:, :2]))
        h = self.rms(h + self.cross_attn(h, c, c)[0])
        return self.head(h.mean(dim=1))

    @staticmethod
    def inputs(b: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, 7, (b, 5), generator=generator)


def _make(method: str, model: nn.Module) -> gramopt.optim.base.SampleSpaceOptimizer:
    if method == "ggn":
        model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)  # GGN: eval-mode BatchNorm
        return gramopt.GGN(model, lr=0.5, damping=0.3, loss="cross_entropy", damping_adaptation=None)
    if method == "seng":
        return gramopt.SENG(model, lr=0.2, damping=0.5, loss="cross_entropy")
    return gramopt.FNGD(model, lr=0.2, damping=0.05, loss="cross_entropy", coefficient_steps=None)


def _build(kind: type[nn.Module]) -> nn.Module:
    torch.manual_seed(3)
    return kind().double()


def _steps(opt, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    for x, y in batches:
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _batches(kind: type[nn.Module], steps: int = 2, b: int = 3) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [(kind.inputs(b, generator), torch.randint(0, 3, (b,), generator=generator)) for _ in range(steps)]


@pytest.mark.parametrize("method", ["ggn", "seng", "fngd"])
@pytest.mark.parametrize("kind", [Vision, Sequence], ids=lambda k: k.__name__.lower())
def test_exact_over_twin_ranks_is_the_step_on_the_doubled_batch(kind, method):
    batches = _batches(kind)
    model, reference = _build(kind), _build(kind)
    opt = _make(method, model)
    opt.sync = TwinRanks()
    got = _steps(opt, model, batches)
    want = _steps(_make(method, reference), reference, [(torch.cat([x, x]), torch.cat([y, y])) for x, y in batches])
    start = torch.cat([p.detach().reshape(-1) for p in _build(kind).parameters()])
    assert (want - start).abs().max() > 1e-3  # the steps move the parameters
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_the_twin_rank_models_cover_every_registered_handler():
    covered = set()
    for kind in (Vision, Sequence):
        opt = gramopt.SENG(_build(kind), lr=0.1, damping=1.0)
        assert not opt.engine.plain_params
        covered |= {type(layer.handler) for layer in opt.engine.layers}
    built_in = {type(handler) for handler in _REGISTRY.values() if type(handler).__module__.startswith("gramopt.")}
    assert covered == built_in


class Scale(nn.Module):
    """``y = x * weight``, elementwise."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, features, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class TupleScaleHandler(gramopt.LayerHandler):
    """Saves ``(x^T, "input")``: a tuple, and a tensor ``[d, b]`` whose batch is not first."""

    def save(self, module, args, output):
        return args[0].detach().transpose(0, 1), "input"

    def factors(self, module, params, saved, grads):
        b, k = grads[0].shape[:2]
        rows = sum(g * x.transpose(0, 1).to(g.dtype).unsqueeze(1) for (x, _), g in zip(saved, grads, strict=True))
        return gramopt.ExplicitFactors(module, params, rows.reshape(b * k, -1))


class TravellingScaleHandler(TupleScaleHandler):
    def saved_tensors(self, saved):
        x, _ = saved
        return [x.transpose(0, 1)]  # batch first

    def restore_saved(self, template, tensors):
        (x,) = tensors
        return x.transpose(0, 1), template[1]


class QuietScale(Scale):
    pass


class TravellingScale(Scale):
    pass


@pytest.fixture(autouse=True)
def scale_handlers(monkeypatch):
    """``gramopt.register_handler`` for the two Scale layers, undone after each test."""
    monkeypatch.setitem(_REGISTRY, QuietScale, TupleScaleHandler())
    monkeypatch.setitem(_REGISTRY, TravellingScale, TravellingScaleHandler())


def _scale_model(scale: type[Scale]) -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 5), scale(5), nn.Tanh(), nn.Linear(5, 2)).double()


def _scale_batches() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    return [(x, torch.randint(0, 2, (4,), generator=generator))]


@pytest.mark.parametrize("method", ["ggn", "seng"])
def test_a_user_handler_that_says_how_its_tuple_travels(method):
    (x, y), = _scale_batches()
    model, reference, whole_batch, accumulated = (_scale_model(TravellingScale) for _ in range(4))
    opt = _make(method, model)
    assert {type(layer.handler) for layer in opt.engine.layers} >= {TravellingScaleHandler}
    opt.sync = TwinRanks()
    got = _steps(opt, model, [(x, y)])
    want = _steps(_make(method, reference), reference, [(torch.cat([x, x]), torch.cat([y, y]))])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    # gradient accumulation: the default merge_saved goes through the same two hooks
    whole = _steps(_make(method, whole_batch), whole_batch, [(x, y)])
    acc = _make(method, accumulated)
    acc.backward(accumulated(x[:1]), y[:1])
    acc.backward(accumulated(x[1:]), y[1:])
    acc.step()
    got = torch.cat([p.detach().reshape(-1) for p in accumulated.parameters()])
    torch.testing.assert_close(got, whole, rtol=1e-9, atol=1e-11)


def test_a_user_handler_that_does_not_say_is_refused_by_name_and_changes_nothing():
    (x, y), = _scale_batches()
    model = _scale_model(QuietScale)
    opt = _make("seng", model)
    opt.sync = TwinRanks()
    before = [p.detach().clone() for p in model.parameters()]
    opt.backward(model(x), y)
    refused = r"layer 1: TupleScaleHandler\.save kept a tuple.*saved_tensors.*restore_saved"
    with pytest.raises(CaptureError, match=refused):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    single = _make("seng", model)  # one process, one micro-batch: nothing needs to travel
    single.backward(model(x), y)
    single.step()
    single.backward(model(x[:2]), y[:2])
    single.backward(model(x[2:]), y[2:])
    with pytest.raises(CaptureError, match=r"micro-batches.*TupleScaleHandler\.save kept a tuple"):
        single.step()
