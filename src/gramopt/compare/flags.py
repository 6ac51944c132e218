"""Step times far outside what an optimizer's arithmetic predicts, and their likely cause.

A comparison ranks optimizers by seconds, so an optimizer whose step takes a slow path
of the machine (a kernel without a fast implementation on this CPU) is ranked for the
machine, not for its method. :func:`step_time_flags` names every optimizer whose median
step time over SGD-momentum's exceeds ``STEP_COST_MARGIN`` times its expected cost
(``config.EXPECTED_STEP_COST``; the rule and the expectations are in the ``config``
module docstring), with the likely cause where one is known.

Known cause: the Muon implementations that orthogonalize in bfloat16
(:data:`BFLOAT16_STEPS`) on a CPU without a fast bfloat16 matmul
(``hardware.bfloat16_matmul``).
"""

from __future__ import annotations

from typing import Any

from gramopt.compare import config as compare_config

#: Optimizers whose step runs matrix products in bfloat16 whatever the model's dtype:
#: what they do in it, and the alternative ("" if none).
BFLOAT16_STEPS: dict[str, tuple[str, str]] = {
    "muon": ("torch.optim.Muon orthogonalizes in bfloat16 (torch has no option for float32)",
             "muon-f32 runs the same update with a float32 orthogonalization"),
    "muon-po": ("pytorch-optimizer's Muon orthogonalizes in bfloat16", ""),
}


def expected_step_cost(name: str) -> float:
    """The step cost of optimizer ``name`` its arithmetic predicts, in SGD-momentum steps."""
    return compare_config.EXPECTED_STEP_COST.get(name, compare_config.DEFAULT_EXPECTED_STEP_COST)


def likely_cause(name: str, bfloat16: dict[str, Any]) -> str:
    """Why optimizer ``name``'s step may be slow on this machine, "" if no cause is known.
    ``bfloat16``: ``hardware.BFloat16Matmul.as_dict()`` of the machine."""
    if name in BFLOAT16_STEPS and not bfloat16["fast"]:
        what, alternative = BFLOAT16_STEPS[name]
        return f"{what} and this CPU has {bfloat16['text']}" + (f"; {alternative}" if alternative else "")
    return ""


def step_time_flags(ratios: dict[str, float | None], bfloat16: dict[str, Any]) -> list[dict[str, Any]]:
    """One flag per optimizer whose median step-time ratio to SGD-momentum (``ratios``;
    None: not measured) exceeds ``STEP_COST_MARGIN`` x its expected cost: the optimizer,
    the ratio, the expectation, the limit crossed, the likely cause ("" if unknown) and
    a sentence saying all of it."""
    flags = []
    for name, ratio in ratios.items():
        if ratio is None:
            continue
        expected = expected_step_cost(name)
        limit = compare_config.STEP_COST_MARGIN * expected
        if ratio <= limit:
            continue
        cause = likely_cause(name, bfloat16)
        margin = compare_config.STEP_COST_MARGIN
        text = (
            f"{name}'s step took {ratio:.3g}x SGD-momentum's, over {limit:g}x ({margin:g} x the {expected:g}x its "
            "arithmetic predicts): its seconds to each rung measure this machine more than the method. "
            + (f"Likely cause: {cause}." if cause else "No known cause on this machine: compare the runs' "
               "median_step_seconds in results.json, and the step alone under a profiler.")
        )
        flags.append(
            {"optimizer": name, "ratio": ratio, "expected": expected, "limit": limit, "cause": cause, "text": text}
        )
    return flags
