"""Embedded tasks: each one a :class:`Task` record (model, data with a fixed split, loss,
metric, ladder of targets, budget, evaluation size, tuned hyper-parameters).

Every task's data is generated or ships with an installed package (or a Debian data
package that the task names), so nothing is downloaded at run time. ``gramopt tasks``
lists them.

Adding a task is one file in this package: build the model and the data (the helpers of
:mod:`gramopt.tasks.data` and :mod:`gramopt.tasks.models`), then ``register_task(Task(...))``.
Every module here is imported when the package is: the families of :data:`FAMILIES` first,
in that order (the order of ``gramopt tasks`` and ``--task all``), then any other module
by file name.
"""

from __future__ import annotations

import importlib
import pkgutil

from gramopt.tasks.data import Split, random_split, standardized, with_validation
from gramopt.tasks.models import mlp, seeded
from gramopt.tasks.record import KINDS, TASKS, Target, Task, get_task, ladder, register_task

#: The task files whose tasks come first, in this order.
FAMILIES = ("regression", "classification", "images", "sequence", "language", "poisson2d", "poisson5d", "heat")


def _import_task_files() -> None:
    """Import :data:`FAMILIES`, then every other module of this package by name: a file
    that registers tasks adds them."""
    others = sorted({module.name for module in pkgutil.iter_modules(__path__)} - set(FAMILIES))
    for name in (*FAMILIES, *others):
        importlib.import_module(f"{__name__}.{name}")


_import_task_files()

__all__ = [
    "KINDS", "Split", "TASKS", "Target", "Task", "get_task", "ladder", "mlp", "random_split", "register_task", "seeded",
    "standardized", "with_validation",
]
