"""Whether the hooks see every use of a parameter: a check on the autograd graph.

The hooks see a parameter only through the calls of the modules that own it. A model
may also use it without calling them (a tied LM head written ``F.linear(h,
tok.weight)``, or ``h @ tok.weight.T``): its gradient then has a part no captured row
holds, and a preconditioned step would be wrong. The graph tells: every use of a leaf
parameter is one edge into its ``AccumulateGrad`` node. Counting those edges from the
model's output (:func:`edge_counts`), and those inside each recorded call of a hooked
module (from the call's output node down to its inputs' nodes), a parameter with more
edges in the whole graph than inside its modules' calls is used elsewhere.

A miss is possible (a use that reaches the parameter through a node shared with a
call, as autocast's cached weight casts are), a false alarm is not: the edges inside
the calls are never fewer than the uses the hooks see.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

Node = Any  # torch.autograd.graph.Node


def in_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev) is running: its graph is not
    autograd's (e.g. a reference computed with ``functional_call`` on the hooked model)."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def gradient_node(p: nn.Parameter) -> Node:
    """The ``AccumulateGrad`` node of a leaf parameter that requires grad."""
    return torch.autograd.graph.get_gradient_edge(p).node


def edge_counts(roots: Iterable[Node], stop: Iterable[Node] = ()) -> Counter:
    """For every ``AccumulateGrad`` node reachable from ``roots`` without passing through
    a node of ``stop``: the number of distinct graph nodes with an edge into it."""
    stop = set(stop)
    counts: Counter = Counter()
    stack = list({root: None for root in roots if root is not None})  # each once, in order
    seen: set[Node] = set(stack)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None or child in stop:
                continue
            if hasattr(child, "variable"):  # AccumulateGrad: a leaf's use
                counts[child] += 1
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return counts


def output_nodes(output: Any, depth: int = 3) -> list[Node]:
    """The ``grad_fn`` of every tensor in a model's output (a tensor, or tuples, lists,
    dicts and ``ModelOutput``-like mappings of them, ``depth`` levels deep)."""
    if isinstance(output, Tensor):
        return [output.grad_fn] if output.grad_fn is not None else []
    if depth == 0:
        return []
    if isinstance(output, dict):
        items: Iterable[Any] = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    else:
        return []
    return [node for item in items for node in output_nodes(item, depth - 1)]
