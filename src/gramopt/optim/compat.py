"""What keeps code written for gramopt 0.1 working for one more release, with a warning
that says what to change."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any


def positional_deprecated(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A method's ``__init__(self, model, lr, damping, *, ...)`` that still takes the
    arguments it took positionally after ``damping`` in gramopt 0.1 (``names``, in that
    order), with a FutureWarning naming each keyword."""

    def wrap(init: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(init)
        def __init__(self: Any, model: Any, *args: Any, **kwargs: Any) -> None:
            if len(args) > 2:
                owner = type(self).__name__
                extra = args[2:]
                if len(extra) > len(names):
                    raise TypeError(f"{owner}() takes model, lr and damping positionally, and at most {len(names)} "
                                    f"more (deprecated) positional arguments, got {len(args) + 1}")
                given = dict(zip(names, extra, strict=False))
                for name in given:
                    if name in kwargs:
                        raise TypeError(f"{owner}() got multiple values for argument {name!r}")
                warnings.warn(
                    f"{owner}(model, lr, damping, ...): passing {', '.join(given)} positionally is deprecated and "
                    f"stops working in gramopt 0.3; pass them by keyword: "
                    + ", ".join(f"{name}={value!r}" for name, value in given.items()),
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs.update(given)
                args = args[:2]
            init(self, model, *args, **kwargs)

        return __init__

    return wrap
