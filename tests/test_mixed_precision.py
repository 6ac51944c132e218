"""The training stack around the optimizers, on CPU: ``torch.compile(model)``,
``torch.autocast`` in bfloat16, channels-last convolutions and the
``torch.amp.GradScaler`` protocol (inf checks and unscaling; a CPU scaler stands in for
the CUDA one, the protocol is the same). Every case is checked against the same
optimizer on the plain float32 model."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import gramopt

OPTIMIZERS = {
    "ggn": lambda m: gramopt.GGN(m, lr=0.3, damping=1.0, loss="cross_entropy"),
    "seng": lambda m: gramopt.SENG(m, lr=0.1, damping=1.0, momentum=0.9),
    "fngd": lambda m: gramopt.FNGD(m, lr=0.1, damping=1e-3, momentum=0.9),
}
# (method, loop): GGN has only its own backward; SENG and FNGD also the ordinary one.
CASES = [("ggn", "uniform"), ("seng", "uniform"), ("seng", "ordinary"), ("fngd", "uniform"), ("fngd", "ordinary")]
CASE_IDS = [f"{method}-{loop}" for method, loop in CASES]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
        nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5),
    )


def batches(steps: int, channels_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        out.append((x.contiguous(memory_format=torch.channels_last) if channels_last else x, y))
    return out


def parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(
    method: str, loop: str, steps: int = 2, *, compiled: bool = False, autocast: str = "none",
    channels_last: bool = False, scaler: torch.amp.GradScaler | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``autocast``: "none", "forward" (forward and backward inside, step outside) or
    "all" (the step inside too)."""
    model = cnn()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else model
    opt = OPTIMIZERS[method](forward if compiled else model)
    region = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast != "none" else contextlib.nullcontext
    for x, y in batches(steps, channels_last):
        opt.zero_grad()
        with region():
            output = forward(x)
            if loop == "uniform":
                loss = opt.backward(output, y)  # computed unscaled by the optimizer itself
                if scaler is not None:
                    scaler.scale(loss)  # a loop written for scaled losses: nothing to unscale after it
            else:
                loss = nn.functional.cross_entropy(output, y)
                (scaler.scale(loss) if scaler else loss).backward()
            if autocast == "all":
                opt.step()
        if autocast != "all":
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
    return model, opt


@pytest.fixture(scope="module")
def float32_runs() -> dict[tuple[str, str], torch.Tensor]:
    runs = {}
    for method, loop in CASES:
        model, opt = train(method, loop)
        runs[method, loop] = parameters(model)
        opt.close()
    return runs


def relative(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> float:
    return float((a - b).norm() / (b - start).norm())


@pytest.mark.slow
@pytest.mark.parametrize(("method", "loop"), CASES, ids=CASE_IDS)
def test_compiled_model_takes_the_eager_step(method, loop, float32_runs):
    # The optimizer built on the compiled module (its hooks sit on the original's layers,
    # which the compiled module calls) and on the original model, compiled afterwards.
    model, opt = train(method, loop, compiled=True)
    assert torch.allclose(parameters(model), float32_runs[method, loop], rtol=0, atol=1e-5)
    assert opt.steps_taken == 2
    opt.close()


def test_compile_with_the_optimizer_on_the_original_model():
    model = cnn()
    opt = gramopt.SENG(model, lr=0.1, damping=1.0, momentum=0.9)
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing, without code generation
    reference_model, reference_opt = train("seng", "ordinary")
    for x, y in batches(2):
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    assert torch.allclose(parameters(model), parameters(reference_model), rtol=0, atol=1e-5)
    opt.close()
    reference_opt.close()


@pytest.mark.parametrize(("method", "loop"), CASES, ids=CASE_IDS)
def test_autocast_bfloat16_step_runs_in_float32(method, loop, float32_runs):
    start = parameters(cnn())
    model, opt = train(method, loop, autocast="forward")
    inside, inside_opt = train(method, loop, autocast="all")
    # The step's own math (Grams, solves, updates) is never autocast: called inside the
    # autocast region it is bitwise the step called outside it.
    assert torch.equal(parameters(inside), parameters(model))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # and the bfloat16 forward/backward passes move it little from the float32 run
    assert relative(parameters(model), float32_runs[method, loop], start) < 0.05
    opt.close()
    inside_opt.close()


def test_a_closure_keeps_the_callers_autocast():
    model = cnn()
    opt = gramopt.SENG(model, lr=0.1, damping=1.0)
    x, y = batches(1)[0]
    seen = []

    def closure():
        opt.zero_grad()
        output = model(x)
        seen.append(output.dtype)
        loss = nn.functional.cross_entropy(output, y)
        loss.backward()
        return loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(closure)
    assert seen == [torch.bfloat16] and opt.steps_taken == 1
    opt.close()


@pytest.mark.parametrize(("method", "loop"), CASES, ids=CASE_IDS)
def test_channels_last_takes_the_contiguous_step(method, loop, float32_runs):
    model, opt = train(method, loop, channels_last=True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(parameters(model), float32_runs[method, loop], rtol=0, atol=1e-5)
    opt.close()


# GGN is left out: its backward passes are of the outputs (Jacobian rows), never of a
# loss a scaler could scale, and it fills no .grad for the scaler to check
# (scaler.update() then fails: "No inf checks were recorded").
@pytest.mark.parametrize(("method", "loop"), CASES[1:], ids=CASE_IDS[1:])
def test_grad_scaler_steps_are_the_unscaled_steps(method, loop, float32_runs):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    model, opt = train(method, loop, scaler=scaler)
    # The scale is a power of two: unscaling is exact, so the steps are the float32 run's.
    assert torch.allclose(parameters(model), float32_runs[method, loop], rtol=0, atol=1e-6)
    assert opt.steps_taken == 2 and scaler.get_scale() == 2.0**12
    opt.close()


@pytest.mark.parametrize("method", ["seng", "fngd"])
def test_grad_scaler_skips_a_step_with_inf_and_changes_nothing(method):
    model = cnn()
    opt = OPTIMIZERS[method](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    (x, y), (x2, y2) = batches(2)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model[0].bias.grad[0] = float("inf")  # as an overflow in half precision would
    before = parameters(model)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(parameters(model), before) and opt.steps_taken == 0
    assert scaler.get_scale() == 2.0**11  # the scaler backed off
    # the next batch steps normally (the skipped step's captures were dropped)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x2), y2)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.steps_taken == 1 and not torch.equal(parameters(model), before)
    opt.close()


def test_grad_scaler_unscales_after_an_earlier_opt_backward_without_step():
    # opt.backward (unscaled, e.g. to read a loss) leaves no mark once zero_grad starts
    # the next step: the scaled ordinary backward that follows is unscaled.
    scaled, plain = cnn(), cnn()
    opts = [gramopt.SENG(m, lr=0.1, damping=1.0) for m in (scaled, plain)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    (x, y), (x2, y2) = batches(2)
    opts[0].backward(scaled(x), y)
    for model, opt in zip((scaled, plain), opts, strict=True):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x2), y2)
        if opt is opts[0]:
            scaler.scale(loss).backward()
            scaler.step(opt)
        else:
            loss.backward()
            opt.step()
        opt.close()
    assert torch.allclose(parameters(scaled), parameters(plain), rtol=0, atol=1e-6)


def test_grad_scaler_unscale_before_step_is_a_clear_error():
    model = cnn()
    opt = gramopt.SENG(model, lr=0.1, damping=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batches(1)[0]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    before = parameters(model)
    with pytest.raises(ValueError, match="scaler.unscale_"):
        scaler.step(opt)
    assert torch.equal(parameters(model), before)
    opt.close()
