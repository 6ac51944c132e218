"""A convolutional autoencoder (strided Conv2d encoder, ConvTranspose2d decoder) on
scikit-learn's 8x8 digits, trained with a gramopt optimizer in an ordinary PyTorch loop:
DataLoader, learning-rate schedule, update clipping, checkpoint (state_dict) and resume.

The loss is the squared reconstruction error, ``loss="mse"``: every method runs its own
``opt.backward(model(x), x)`` (per image ``0.5 ||f_i - x_i||^2``, as GGN defines it; the
printed losses are ``F.mse_loss``, the mean over pixels). GGN (default; Gauss-Newton for
least squares is its home ground) builds one Jacobian row per output pixel (64 per
image), so it uses a smaller batch (``--batch-size``, default 8 for GGN, 64 otherwise).
After 100 steps (seed 0, default batches) the test loss was 0.0038 with GGN, 0.034 with
SENG and 0.086 with FNGD (GGN with batches of 16: 0.0018; after 200 steps SENG reached
0.014, FNGD 0.058; FNGD's hyper-parameters were tuned little).

Clipping: ``clip_grad_norm_`` on ``.grad`` does not reach the preconditioned step;
``--max-update-norm`` passes ``max_update_norm`` to the optimizer, which clips the step's
direction instead. Data: ``sklearn.datasets.load_digits`` (ships with scikit-learn, in
``pip install "gramopt[compare]"``); 20% held out. About 20 s on one CPU thread (GGN).

    python examples/conv_autoencoder_digits.py                          # GGN, 100 steps
    python examples/conv_autoencoder_digits.py --method seng --steps 400
    python examples/conv_autoencoder_digits.py --steps 100 --checkpoint ae.pt   # then --steps 200: resumes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gramopt
from gramopt.tasks.classification import load_digits


def autoencoder(width: int = 16) -> nn.Module:
    """``[b, 1, 8, 8]`` -> ``[b, width, 4, 4]`` -> ``[b, 2 width, 2, 2]`` (code) -> ``[b, width, 4, 4]``
    -> ``[b, 1, 8, 8]`` in (0, 1)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(2 * width, width, 2, 2), nn.ReLU(), nn.ConvTranspose2d(width, 1, 2, 2), nn.Sigmoid(),
    )


def make_optimizer(method: str, model: nn.Module, max_update_norm: float | None) -> torch.optim.Optimizer:
    if method == "fngd":
        return gramopt.FNGD(model, lr=0.5, damping=1.0, loss="mse", momentum=0.9, max_update_norm=max_update_norm)
    if method == "seng":
        return gramopt.SENG(model, lr=0.5, damping=0.1, loss="mse", momentum=0.9, max_update_norm=max_update_norm)
    if method == "ggn":
        return gramopt.GGN(model, lr=0.5, damping=1.0, loss="mse", max_update_norm=max_update_norm)
    raise ValueError(f"unknown method {method!r}; choose fngd, seng or ggn")


def train_step(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor) -> float:
    """One step; the batch's mean squared reconstruction error before it."""
    opt.zero_grad()
    loss = opt.backward(model(x), x)  # the optimizer's loss: 0.5 ||f_i - x_i||^2 per image
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def reconstruction_error(model: nn.Module, x: torch.Tensor) -> float:
    """Mean squared error per pixel (the loss; pixels in [0, 1])."""
    return float(F.mse_loss(model(x), x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ggn", choices=["ggn", "seng", "fngd"])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all (with a resumed checkpoint's)")
    parser.add_argument("--batch-size", type=int, help="default 64 (GGN: 8)")
    parser.add_argument("--max-update-norm", type=float, default=10.0, help="clip the step's direction (0: off)")
    parser.add_argument("--checkpoint", type=Path, help="resume from it if it exists; written at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = load_digits(args.seed)
    images = lambda flat: flat.view(-1, 1, 8, 8)  # noqa: E731
    train_x, test_x = images(data.train_x), images(data.test_x)
    batch_size = args.batch_size or (8 if args.method == "ggn" else 64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_x), batch_size=batch_size, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(args.seed),
    )
    model = autoencoder()
    opt = make_optimizer(args.method, model, args.max_update_norm or None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    step = 0
    if args.checkpoint is not None and args.checkpoint.exists():
        saved = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step = saved["step"]
        print(f"resumed from {args.checkpoint} at step {step}")
    print(f"digits: {len(train_x)} train, {len(test_x)} test images; autoencoder with "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.method}")
    running = None
    while step < args.steps:
        for (x,) in loader:
            loss = train_step(opt, model, x)
            scheduler.step()
            step += 1
            running = loss if running is None else 0.9 * running + 0.1 * loss
            if step % 50 == 0 or step == args.steps:
                print(f"step {step:4d}  train loss {running:.4f}  test loss {reconstruction_error(model, test_x):.4f}")
            if step == args.steps:
                break
    if args.checkpoint is not None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}
        torch.save({**state, "step": step}, args.checkpoint)
        print(f"wrote {args.checkpoint}")
    opt.close()


if __name__ == "__main__":
    main()
