"""What code and checkpoints of gramopt 0.1.x keep doing: state dicts saved by 0.1.x load
and resume exactly (GGN's damping adaptation moved from the top level of ``extra_state``
into ``extra_state["damping_adaptation"]``; the conversion happens on load), and the
constructors' deprecated positional arguments still work, with a FutureWarning naming the
keyword. One constructor shape, and its defaults as docs/api.md states them."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

import gramopt
import models
from toy_method import DiagonalFisher

FIXTURE = Path(__file__).with_name("data") / "state_dicts_0_1.pt"
_loader = importlib.util.spec_from_file_location("make_old_state_dicts", FIXTURE.with_name("make_old_state_dicts.py"))
MAKER = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(MAKER)  # its CONFIGS and model(): how the fixture was made


@pytest.fixture(scope="module")
def saved() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("name", list(MAKER.CONFIGS))
def test_a_state_dict_of_0_1_resumes_exactly(saved, name):
    """Load the saved state into a fresh optimizer on the saved model: the next three
    steps are bitwise those the saving optimizer took."""
    record = saved[name]
    make, _ = MAKER.CONFIGS[name]
    net = MAKER.model()
    net.load_state_dict(record["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt = make(net)
    opt.load_state_dict(copy.deepcopy(record["state_dict"]))
    assert opt.steps_taken == 3
    for (x, y), expected in zip(record["batches"][3:], record["after"], strict=True):
        opt.zero_grad()
        opt.backward(net(x), y)
        opt.step()
        for p, q in zip(net.parameters(), expected, strict=True):
            assert torch.equal(p, q)


def test_the_0_1_layout_is_converted(saved):
    """``damping_floor``, ``loss_average``, ``last_ratio`` and ``rejected_steps`` move into
    the adaptation's state; its floor is the one 0.1 applied (the constructor's damping,
    or ``AdaptiveDamping.min_damping`` where set); a state saved without adaptation starts
    the adaptation afresh, and the new layout round-trips."""
    old = saved["ggn-adaptive"]["state_dict"]["gramopt"]
    assert {"damping_floor", "rejected_steps", "last_ratio"} <= set(old) and old["rejected_steps"] > 0
    net = MAKER.model()
    opt = gramopt.GGN(net, lr=2.0, damping=0.01, loss="mse")
    opt.load_state_dict(copy.deepcopy(saved["ggn-adaptive"]["state_dict"]))
    state = opt.extra_state["damping_adaptation"]
    assert state == {
        "min_damping": old["damping_floor"],
        "loss_average": old["loss_average"],
        "last_ratio": old["last_ratio"],
        "rejected_steps": old["rejected_steps"],
    }
    assert not {"damping_floor", "rejected_steps", "last_ratio", "loss_average"} & set(opt.extra_state)
    floor = gramopt.GGN(MAKER.model(), damping=0.5, loss="cross_entropy",
                        damping_adaptation=gramopt.AdaptiveDamping(every=1, min_damping=0.2))
    floor.load_state_dict(copy.deepcopy(saved["ggn-sampled-floor"]["state_dict"]))
    assert floor.extra_state["damping_adaptation"]["min_damping"] == 0.2
    fixed = gramopt.GGN(MAKER.model(), lr=0.5, damping=0.3, loss="mse")  # adaptation on, state saved without
    fixed.load_state_dict(copy.deepcopy(saved["ggn-fixed"]["state_dict"]))
    assert fixed.extra_state["damping_adaptation"]["min_damping"] == 0.1  # the saved constructor's damping
    fresh = gramopt.GGN(MAKER.model(), lr=0.5, damping=0.3, loss="mse")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.extra_state == opt.extra_state


def test_the_adaptation_floor_lives_in_its_state_only(float64):
    """The floor in force is ``extra_state["damping_adaptation"]["min_damping"]``: lowered
    there, the damping goes below the constructor's; param_groups hold the damping."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False)
    x, y = torch.randn(6, 4), torch.randn(6, 3)  # a linear mse model is its own quadratic model: rho = 1
    rule = gramopt.AdaptiveDamping(every=1)
    opt = gramopt.GGN(model, lr=0.8, damping=0.5, damping_adaptation=rule)
    assert opt.extra_state["damping_adaptation"]["min_damping"] == 0.5
    opt.backward(model(x), y)
    opt.step()
    assert opt.damping == 0.5  # held at the floor
    opt.extra_state["damping_adaptation"]["min_damping"] = 0.01
    opt.backward(model(x), y)
    opt.step()
    assert opt.damping == pytest.approx(0.5 * rule.decrease) and opt.param_groups[0]["damping"] == opt.damping


CONSTRUCTORS = [
    (gramopt.GGN, (1.0, 0.3, "cross_entropy", "cg", 0.5, 0.01), ("loss", "solver", "momentum", "weight_decay")),
    (
        gramopt.SENG,
        (0.1, 1.0, 0.5, 0.01, 2, None, "mse"),
        ("momentum", "weight_decay", "curvature_every", "sketch", "loss"),
    ),
    (gramopt.FNGD, (0.1, 1e-3, 0.5, 0.01, 4, "mse"), ("momentum", "weight_decay", "coefficient_steps", "loss")),
]


@pytest.mark.parametrize("cls, args, names", CONSTRUCTORS, ids=lambda v: getattr(v, "__name__", None))
def test_positional_arguments_after_damping_are_deprecated(cls, args, names):
    """``cls(model, lr, damping, *rest)`` in the positions of gramopt 0.1 works as before,
    with a FutureWarning that names the keywords; the keyword call is silent."""
    model = models.mlp(out=3)
    with pytest.warns(FutureWarning, match="pass them by keyword: " + ", ".join(f"{n}=" for n in names[:1])) as seen:
        old = cls(model, *args)
    assert all(f"{n}=" in str(seen[0].message) for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = cls(models.mlp(out=3), args[0], args[1], **dict(zip(names, args[2:], strict=False)))
    assert old.param_groups[0].keys() == new.param_groups[0].keys()
    assert all(old.param_groups[0][k] == new.param_groups[0][k] for k in old.param_groups[0] if k != "params")
    assert old.loss.name == new.loss.name
    with pytest.raises(TypeError, match=f"multiple values for argument '{names[0]}'"):
        cls(model, *args[:3], **{names[0]: args[2]})
    with pytest.raises(TypeError, match="at most"):
        cls(model, *args, *([None] * 3))


def test_loss_is_a_keyword_of_every_method():
    """One constructor shape: ``Method(model, lr, damping, *, loss=..., ...)``."""
    for cls in (gramopt.GGN, gramopt.SENG, gramopt.FNGD, DiagonalFisher):
        parameters = inspect.signature(cls).parameters
        assert list(parameters)[:3] == ["model", "lr", "damping"]
        assert parameters["loss"].kind is inspect.Parameter.KEYWORD_ONLY
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(parameters.values())[3:])


def test_the_defaults_table_is_the_constructors():
    """docs/api.md's table of defaults: lr, damping, momentum, weight_decay and loss as
    the constructors set them (GGN's lr and damping per loss)."""
    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    rows = _table_rows(api.split("`GaussNewton` minimizes", 1)[0])
    methods = (gramopt.GGN, gramopt.SENG, gramopt.FNGD)
    for cls, cell in zip(methods, rows["loss"], strict=True):
        assert cls(models.mlp(out=3)).loss.name == cell.strip('`"')
    for i, cls in enumerate(methods):
        for loss in ("mse", "cross_entropy"):
            group = cls(models.mlp(out=3), loss=loss).param_groups[0]
            for name in ("lr", "damping", "momentum", "weight_decay"):
                numbers = [float(v) for v in re.findall(r"(?<![\w^])\d+\.\d+(?:e-?\d+)?", rows[name][i])]
                expected = numbers[0 if loss == "mse" else 1] if "for `loss=" in rows[name][i] else numbers[0]
                assert group[name] == expected, (cls.__name__, loss, name, rows[name][i])


def _table_rows(text: str) -> dict[str, list[str]]:
    """The rows ``| `name` | cell | ... |`` of a markdown text, by name."""
    return {
        line.split("|")[1].strip(" `"): [cell.strip() for cell in line.split("|")[2:5]]
        for line in text.splitlines()
        if line.startswith("| `")
    }


def test_the_gauss_newton_defaults_table_is_its_constructor():
    """docs/api.md's GaussNewton table: the numbers it gives are the constructor's."""
    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    rows = _table_rows(api.split("`GaussNewton` minimizes", 1)[1])
    opt = gramopt.GaussNewton(models.mlp(out=1).double())
    group = opt.param_groups[0]
    for name in ("lr", "damping", "momentum", "weight_decay"):
        assert group[name] == float(rows[name][0].split()[0]), (name, rows[name][0])
    trials = re.search(r"line_search_trials=(\d+)", rows["line_search"][0])
    assert trials is not None and opt.line_search_trials == int(trials.group(1))
    assert f'"{opt.line_search}"' in rows["line_search"][0] and f'"{opt.jacobian}"' in rows["jacobian"][0]
    every = re.search(r"check_every=(\d+)", rows["jacobian"][0])
    assert every is not None and opt.check_every == int(every.group(1))

