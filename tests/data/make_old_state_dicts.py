"""Writes ``state_dicts_0_1.pt``: optimizer state_dicts in the layout of gramopt 0.1.x,
with what the saving optimizer did next, for tests/test_state_upgrade.py.

It ran once on gramopt 0.1.0 (GGN's extra_state then held ``damping_floor``,
``rejected_steps``, ``loss_average`` and ``last_ratio`` at its top level); running it on a
later version writes that version's layout instead, so the committed file is kept as it is.

Per configuration: the model's initial state, six batches, the optimizer's state_dict
and the model's state after the first three steps, and the parameters after each of the
last three steps taken by the optimizer that saved it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import gramopt

CONFIGS = {
    # adaptation on, with rejected steps before the save (lr 2, damping 0.01 on mse)
    "ggn-adaptive": (lambda m: gramopt.GGN(m, lr=2.0, damping=0.01, loss="mse"), "mse"),
    "ggn-fixed": (lambda m: gramopt.GGN(m, lr=0.5, damping=0.1, loss="mse", damping_adaptation=None), "mse"),
    "ggn-sampled-floor": (
        lambda m: gramopt.GGN(
            m, lr=1.0, damping=0.5, loss="cross_entropy", curvature="sampled", seed=3,
            damping_adaptation=gramopt.AdaptiveDamping(every=1, min_damping=0.2),
        ),
        "cross_entropy",
    ),
    "seng-sketch": (
        lambda m: gramopt.SENG(m, lr=0.1, damping=0.5, loss="cross_entropy", curvature_every=2,
                               sketch=gramopt.SketchConfig(size=0.5, seed=1)),
        "cross_entropy",
    ),
    "fngd-sharing": (
        lambda m: gramopt.FNGD(m, lr=0.1, damping=0.05, loss="cross_entropy", coefficient_steps=2),
        "cross_entropy",
    ),
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def batches(loss: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(6):
        x = torch.randn(8, 4, generator=g)
        y = torch.randn(8, 3, generator=g) if loss == "mse" else torch.randint(0, 3, (8,), generator=g)
        out.append((x, y))
    return out


def main(path: Path) -> None:
    warnings.simplefilter("ignore")
    records = {"version": gramopt.__version__}
    for name, (make, loss) in CONFIGS.items():
        net = model()
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        opt = make(net)
        data = batches(loss)
        after = []
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            opt.backward(net(x), y)
            opt.step()
            if i == 2:
                saved_state = opt.state_dict()
                saved_model = {k: v.clone() for k, v in net.state_dict().items()}
            if i >= 3:
                after.append([p.detach().clone() for p in net.parameters()])
        records[name] = {
            "initial": initial, "batches": data, "state_dict": saved_state, "model": saved_model, "after": after,
        }
    torch.save(records, path)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("state_dicts_0_1.pt"))
