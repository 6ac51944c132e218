"""Gradient accumulation: several backward calls on micro-batches before one step give
the step of their concatenated batch (float64, against the single-batch step).

Uniform loop: ``opt.backward`` on each micro-batch weighs it by b_m / B itself. Ordinary
loop (SENG, FNGD): each micro-batch's mean loss times b_m / B (for equal sizes: divided
by the number of micro-batches, the PyTorch idiom); unequal sizes are warned about,
since the optimizer cannot tell whether the loss was weighed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt

SPLITS = [(3, 5), (2, 3, 4)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def _make(method: str, model: nn.Module, loss: str):
    if method == "ggn":
        # damping adaptation measures its reduction ratio on single batches (skipped on accumulated steps)
        return gramopt.GGN(model, lr=0.5, damping=0.1, loss=loss, damping_adaptation=None)
    if method == "seng":
        return gramopt.SENG(model, lr=0.5, damping=0.1, loss=loss)
    return gramopt.FNGD(model, lr=0.5, damping=0.01, loss=loss)


def _data(n: int, loss: str):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    if loss == "mse":
        return x, torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def _loss_fn(loss: str):
    return (
        (lambda out, y: 0.5 * F.mse_loss(out, y, reduction="sum") / out.shape[0] * 0 + F.mse_loss(out, y))
        if loss == "mse"
        else F.cross_entropy
    )


CASES = [
    ("ggn", "uniform", "mse"),
    ("ggn", "uniform", "cross_entropy"),
    ("seng", "uniform", "cross_entropy"),
    ("seng", "ordinary", "mse"),
    ("fngd", "uniform", "cross_entropy"),
    ("fngd", "ordinary", "cross_entropy"),
]


@pytest.mark.parametrize("split", SPLITS, ids=["2-micro", "3-micro"])
@pytest.mark.parametrize("method, loop, loss", CASES, ids=["-".join(c) for c in CASES])
def test_accumulated_step_is_the_concatenated_batch_step(method, loop, loss, split):
    x, y = _data(sum(split), loss)
    whole, parts = _model(), _model()
    opt_whole, opt_parts = _make(method, whole, loss), _make(method, parts, loss)
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
    for _ in range(2):  # the second step reuses the optimizer (state, cleared captures)
        opt_whole.zero_grad()
        if loop == "uniform":
            opt_whole.backward(whole(x), y)
        else:
            loss_fn(whole(x), y).backward()
        grads_whole = {n: p.grad.clone() for n, p in whole.named_parameters() if p.grad is not None}
        opt_whole.step()
        opt_parts.zero_grad()
        start, total = 0, sum(split)
        for b in split:
            xb, yb = x[start : start + b], y[start : start + b]
            start += b
            if loop == "uniform":
                opt_parts.backward(parts(xb), yb)
            else:
                (loss_fn(parts(xb), yb) * (b / total)).backward()  # weighed: exact for any sizes
        grads_parts = {n: p.grad.clone() for n, p in parts.named_parameters() if p.grad is not None}
        assert grads_parts.keys() == grads_whole.keys()
        for n in grads_whole:  # .grad is consistent with the step: that of the whole batch
            torch.testing.assert_close(grads_parts[n], grads_whole[n], rtol=1e-10, atol=1e-12)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt_parts.step()
        unequal = [w for w in caught if "unequal sizes" in str(w.message)]
        assert bool(unequal) == (loop == "ordinary" and len(set(split)) > 1 and opt_parts.steps_taken == 1)
        for (n, p), q in zip(whole.named_parameters(), parts.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11, msg=n)
    if loop == "uniform":
        assert opt_parts.last_info.loss == pytest.approx(opt_whole.last_info.loss, rel=1e-12)


@pytest.mark.parametrize("method", ["seng", "fngd"])
def test_equal_micro_batches_divided_by_their_number(method):
    """The PyTorch idiom: loss / number of micro-batches, equal sizes: exact, no warning."""
    x, y = _data(8, "cross_entropy")
    whole, parts = _model(), _model()
    opt_whole, opt_parts = _make(method, whole, "cross_entropy"), _make(method, parts, "cross_entropy")
    F.cross_entropy(whole(x), y).backward()
    opt_whole.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for xb, yb in zip(x.chunk(2), y.chunk(2), strict=True):
            (F.cross_entropy(parts(xb), yb) / 2).backward()
        opt_parts.step()
    for p, q in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


def test_micro_batches_of_other_shapes_are_refused_by_name():
    """Sequences of other lengths cannot be concatenated along the batch dimension."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.LazyLinear(2)).double()
    model(torch.randn(1, 5, 4, dtype=torch.float64))
    opt = gramopt.SENG(model, lr=0.1, damping=0.1, loss="mse")
    for t in (5, 5):
        F.mse_loss(model(torch.randn(2, t, 4, dtype=torch.float64)), torch.zeros(2, 2, dtype=torch.float64)).backward()
    opt.step()
    seq = nn.Sequential(nn.Linear(4, 3)).double()
    opt = gramopt.SENG(seq, lr=0.1, damping=0.1, loss="mse")
    for t in (5, 6):
        seq(torch.randn(2, t, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(gramopt.CaptureError, match="layer 0: the micro-batches of this step cannot be concatenated"):
        opt.step()
