"""``gramopt compare``: optimizers head to head on the embedded tasks, fairly timed.

:mod:`~gramopt.compare.run` runs a comparison (grids, seeds, budgets, selection);
:mod:`~gramopt.compare.config` holds what it compares, as data; :mod:`~gramopt.compare.timing`
times step functions interleaved; :mod:`~gramopt.compare.memory` and
:mod:`~gramopt.compare.hardware` record peak memory and the machine;
:mod:`~gramopt.compare.report`, :mod:`~gramopt.compare.plots` and
:mod:`~gramopt.compare.flags` turn the results into tables, curves and warnings.
"""
