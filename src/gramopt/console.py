"""The ``gramopt`` console script (and ``python -m gramopt``).

The command line, its tasks and the peers it compares against need the ``compare``
extra (``pip install "gramopt[compare]"``); the core install has torch and numpy only.
A missing package of that extra ends the command with a message naming the install,
not a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

INSTALL_HINT = 'pip install "gramopt[compare]"'

# Top-level module of each package of the `compare` extra -> its name on PyPI.
COMPARE_EXTRA_MODULES = {
    "rich": "rich",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "mlxtend": "mlxtend",
    "pytorch_optimizer": "pytorch-optimizer",
    "singd": "singd",
    "einops": "einops",
    "einconv": "einconv",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gramopt.cli.main``; a missing package of the ``compare`` extra is a clear
    message on stderr and exit status 1."""
    try:
        from gramopt.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as err:
        package = COMPARE_EXTRA_MODULES.get((err.name or "").partition(".")[0])
        if package is None:
            raise
        print(
            f"gramopt: the command line needs {package}, which is not installed; "
            f"install the command line's extra: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 1
