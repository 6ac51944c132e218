"""Imported once by the fork server of tests/test_benchmarks.py, before it forks a process
per benchmark script: the imports and first-use costs every script pays (torch, its
optimizer machinery, matplotlib's Agg backend and fonts, gramopt), so that each forked
script starts warm. Starts no thread (forking after one would be unsafe)."""

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401 - torch.optim.Optimizer imports it on first use

import gramopt  # noqa: E402,F401
import gramopt.compare.run  # noqa: E402,F401
import gramopt.tasks  # noqa: E402,F401
import gramopt.training  # noqa: E402,F401

figure, axes = plt.subplots()
axes.set_title("warm-up")
figure.savefig(io.BytesIO(), format="png")
plt.close(figure)
