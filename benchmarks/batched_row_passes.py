"""GGN's row passes as one vmapped backward? (issue 16)

GGN's "top" curvature (s = 3) runs s backward passes from the logits down to the captured
layers' outputs (``gramopt.capture.engine.CaptureEngine.backward_passes``, one
``torch.autograd.grad`` per column). This times, on the ``mnist`` / ``fashion-mnist`` small
CNN with a batch of 128 and one thread, interleaved in one process: the s = 3 passes as a
loop, the same 3 passes as one ``torch.autograd.grad(..., is_grads_batched=True)`` call
(vmap over the backward), and one ordinary ``loss.backward()`` for scale. Medians of 30
rounds; prints them (no results file: a one-line answer, recorded in benchmarks/notes.md).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/batched_row_passes.py
"""

from __future__ import annotations

import statistics
import time

import torch

from gramopt.tasks.images import small_cnn

PASSES = 3
ROUNDS = 30


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(128, 1, 28, 28)
    captured: list[torch.Tensor] = []
    for index in (0, 3, 7):  # the two convolutions and the classifier
        model[index].register_forward_hook(lambda module, inputs, output: captured.append(output))

    def row_passes(batched: bool) -> float:
        captured.clear()
        logits = model(x)
        directions = torch.randn(PASSES, *logits.shape)
        start = time.perf_counter()
        if batched:
            torch.autograd.grad(logits, captured, grad_outputs=directions, is_grads_batched=True, retain_graph=True)
        else:
            for k in range(PASSES):
                torch.autograd.grad(logits, captured, grad_outputs=directions[k], retain_graph=True)
        return time.perf_counter() - start

    def full_backward() -> float:
        captured.clear()
        loss = model(x).square().mean()
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start

    for _ in range(3):
        row_passes(True), row_passes(False), full_backward()
    loop, batched, full = [], [], []
    for _ in range(ROUNDS):
        loop.append(row_passes(False))
        batched.append(row_passes(True))
        full.append(full_backward())
    ms = lambda values: 1e3 * statistics.median(values)  # noqa: E731
    print(f"{PASSES} passes as a loop {ms(loop):.2f} ms, as one vmapped call {ms(batched):.2f} ms, one loss.backward() {ms(full):.2f} ms")


if __name__ == "__main__":
    main()
