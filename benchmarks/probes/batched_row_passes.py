"""Probe: GGN's row passes as one vmapped backward? No: on CPU the loop is faster.

Conclusion (benchmarks/notes.md, "can GGN catch SGD-momentum on a second classification
task?"): on the mnist CNN, batch 128, one thread, the 3 passes as a loop took 17.7-21.3 ms,
as one ``torch.autograd.grad(..., is_grads_batched=True)`` call 29.6-35.3 ms (one ordinary
``loss.backward()``: 10.4-16.4 ms), so the capture engine keeps its loop. Not measured on a
GPU, where batching could win. The committed run printed its line (no results file); a run
now writes ``batched_row_passes.json``.

What it times: GGN's "top" curvature (s = 3) runs s backward passes from the logits down to
the captured layers' outputs (``gramopt.capture.engine.CaptureEngine.backward_passes``, one
``torch.autograd.grad`` per column). On the ``mnist`` / ``fashion-mnist`` small CNN,
interleaved in one process: the s = 3 passes as a loop, the same passes as one vmapped call,
and one ordinary ``loss.backward()`` for scale; medians over the rounds.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/probes/batched_row_passes.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from gramopt.tasks.images import small_cnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import arguments, environment, write_json  # noqa: E402

PASSES = 3


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rounds = 8, 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(args.batch, 1, 28, 28)
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
    seconds: dict[str, list[float]] = {"loop": [], "vmapped": [], "loss_backward": []}
    for _ in range(args.rounds):
        seconds["loop"].append(row_passes(False))
        seconds["vmapped"].append(row_passes(True))
        seconds["loss_backward"].append(full_backward())
    median_ms = {key: 1e3 * statistics.median(values) for key, values in seconds.items()}
    print(
        f"{PASSES} passes as a loop {median_ms['loop']:.2f} ms, as one vmapped call {median_ms['vmapped']:.2f} ms, "
        f"one loss.backward() {median_ms['loss_backward']:.2f} ms"
    )
    record = {"what": f"{PASSES} row passes of the mnist CNN, batch {args.batch}", "median_ms": median_ms}
    write_json({**record, "seconds": seconds, "environment": environment()}, args.out / "batched_row_passes.json")


if __name__ == "__main__":
    main()
