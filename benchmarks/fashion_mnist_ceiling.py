"""How high the fashion-mnist task's small CNN gets in 120 s (its compare budget).

The two optimizers fastest to test accuracy 0.90 in the committed 60-s comparison
(AdamW lr 0.0067, SOAP lr 0.003; seed 0), trained through ``gramopt.compare``'s own
``run_one`` for 120 s of optimizer time with its 40 evaluations on the 2,000-image test
subset. Decides the ladder's top rung (``gramopt.compare.config.LADDERS``).
Writes benchmarks/results/fashion_mnist_ceiling.json: per optimizer, a list of
(seconds, test accuracy, validation accuracy). One thread; about 6 minutes.
"""

import json
from pathlib import Path

import torch
from rich.console import Console

from gramopt.compare import run as R
from gramopt.compare.run import Budget
from gramopt.tasks import TASKS

OUT = Path(__file__).parent / "results" / "fashion_mnist_ceiling.json"

torch.set_num_threads(1)
task = TASKS["fashion-mnist"]
splits = R.load_splits(task, 1)
out = {}
for name, hyper in [("adamw", {"lr": 0.006666666666666666}), ("soap", {"lr": 0.003})]:
    rec = R.run_one(task, name, hyper, splits[0], 0, Budget(seconds=120.0, epochs=None), Console(quiet=True), False)
    accs = [(round(e["seconds"], 1), e["test_accuracy"], e["val_accuracy"]) for e in rec["history"]]
    out[name] = accs
    print(name, "max test", max(a[1] for a in accs), "last", accs[-1], flush=True)
OUT.write_text(json.dumps(out))
