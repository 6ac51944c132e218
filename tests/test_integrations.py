"""Trainer frameworks on CPU with tiny models: PyTorch Lightning (SENG and FNGD under
automatic optimization, GGN under manual optimization) and the Hugging Face Trainer
(SENG and FNGD in the plain Trainer, GGN through gramopt.integrations.huggingface).

Each framework run is checked against the same optimizer driven by a plain loop over
the same batches: the parameters must agree, so the framework runs exactly the
optimizer's step (no step skipped, repeated or altered)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gramopt

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def assert_same_parameters(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.allclose(pa[name], pb[name], rtol=0, atol=atol), (name, (pa[name] - pb[name]).abs().max())


# -- PyTorch Lightning --------------------------------------------------------------------

OPTIMIZERS = {
    "seng": lambda m: gramopt.SENG(m, lr=0.1, damping=1.0, momentum=0.9),
    "fngd": lambda m: gramopt.FNGD(m, lr=0.1, damping=1e-3, momentum=0.9, coefficient_steps=4),
    "ggn": lambda m: gramopt.GGN(m, lr=0.3, damping=1.0, loss="cross_entropy"),
}


def classification_data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, :3].sum(dim=1) > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def lightning_modules():
    lightning = pytest.importorskip("lightning", reason="lightning is in the test extra")

    class Classifier(lightning.LightningModule):
        """SENG or FNGD under automatic optimization: Lightning runs the closure
        (training_step, backward) inside ``optimizer.step``."""

        def __init__(self, method: str) -> None:
            super().__init__()
            self.method = method
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return OPTIMIZERS[self.method](self)

    class GaussNewtonClassifier(Classifier):
        """GGN under manual optimization: its backward takes outputs and targets."""

        def __init__(self) -> None:
            super().__init__("ggn")
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            loss = opt.optimizer.backward(self(x), y)
            opt.step()
            self.log("train_loss", loss)
            return loss

    return lightning, Classifier, GaussNewtonClassifier


@pytest.mark.parametrize("method", ["seng", "fngd", "ggn"])
def test_lightning_runs_the_optimizers_step(method):
    lightning, Classifier, GaussNewtonClassifier = lightning_modules()
    make = (lambda: GaussNewtonClassifier()) if method == "ggn" else (lambda: Classifier(method))
    torch.manual_seed(0)
    trained = make()
    torch.manual_seed(0)
    reference = make()
    assert_same_parameters(trained, reference)

    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(trained, classification_data())
    assert trainer.optimizers[0].steps_taken == 12  # 6 batches x 2 epochs

    opt = reference.configure_optimizers()
    for _ in range(2):
        for x, y in classification_data():
            opt.zero_grad()
            if method == "ggn":
                opt.backward(reference(x), y)
            else:
                nn.functional.cross_entropy(reference(x), y).backward()
            opt.step()
    assert_same_parameters(trained, reference, atol=1e-6)
    trainer.optimizers[0].close()
    opt.close()


# -- Hugging Face Trainer ------------------------------------------------------------------

BATCH, LENGTH, VOCAB, LABELS = 12, 6, 40, 3


def tiny_bert():
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (in the test extra)")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers, transformers.BertForSequenceClassification(config).double()


class Sequences(torch.utils.data.Dataset):
    """Token sequences whose label is the first token mod 3. ``position_ids`` are given per
    sample: BERT's default ``[1, s]`` position ids reach the position embedding with a batch
    of 1, which SENG's and GGN's per-sample captures refuse (a clear CaptureError)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)

    def __len__(self) -> int:
        return BATCH

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "position_ids": torch.arange(LENGTH), "labels": self.ids[i, 0] % LABELS}

    def batch(self) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate([self[i] for i in range(BATCH)])


def hf_args(transformers, tmp_path, steps: int):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=0.1,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
        logging_strategy="no", disable_tqdm=True, seed=0,
    )


@pytest.mark.parametrize("method", ["seng", "fngd", "ggn"])
def test_hugging_face_trainer_runs_the_optimizers_step(method, tmp_path):
    transformers, trained = tiny_bert()
    reference = type(trained)(trained.config).double()
    reference.load_state_dict(trained.state_dict())
    make = {
        "seng": lambda m: gramopt.SENG(m, lr=0.1, damping=1.0),
        "fngd": lambda m: gramopt.FNGD(m, lr=0.1, damping=1e-3),
        "ggn": lambda m: gramopt.GGN(m, lr=0.1, damping=1.0, loss="cross_entropy"),
    }[method]
    opt = make(trained)
    data = Sequences()
    if method == "ggn":
        from gramopt.integrations.huggingface import GramoptTrainer

        trainer_class = GramoptTrainer
    else:
        trainer_class = transformers.Trainer
    trainer = trainer_class(
        model=trained, args=hf_args(transformers, tmp_path, 3), train_dataset=data, optimizers=(opt, None)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trainer.train()
    assert result.global_step == 3 and opt.steps_taken == 3

    # The Trainer shuffles the one batch each epoch: the steps equal the plain loop's up
    # to the order of the samples (rounding), hence float64 and a tolerance.
    ref_opt = make(reference)
    batch = data.batch()
    for _ in range(3):
        ref_opt.zero_grad()
        if method == "ggn":
            labels = batch["labels"]
            ref_opt.backward(reference(**{k: v for k, v in batch.items() if k != "labels"}).logits, labels)
        else:
            reference(**batch).loss.backward()
        ref_opt.step()
    assert_same_parameters(trained, reference, atol=1e-9)
    opt.close()
    ref_opt.close()


HF_METHODS = {
    "seng": lambda m, **kw: gramopt.SENG(m, lr=0.1, damping=1.0, **kw),
    "fngd": lambda m, **kw: gramopt.FNGD(m, lr=0.1, damping=1e-3, **kw),
    "ggn": lambda m, **kw: gramopt.GGN(m, lr=0.1, damping=1.0, loss="cross_entropy", damping_adaptation=None, **kw),
}


def plain_loop_steps(model: nn.Module, opt, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    """``steps`` steps of ``opt.backward(logits, labels)`` on the whole batch; the losses."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        losses.append(float(opt.backward(model(**inputs).logits, batch["labels"])))
        opt.step()
    return losses


@pytest.mark.parametrize("method", ["seng", "fngd", "ggn"])
def test_gramopt_trainer_accumulation_gives_the_step_of_the_whole_batch(method, tmp_path):
    """gradient_accumulation_steps=3 on micro-batches of 4: each step equals one step on
    the 12 samples at once (the Trainer shuffles them; float64), and the logged loss is the
    whole batch's mean loss."""
    transformers, trained = tiny_bert()
    from gramopt.integrations.huggingface import GramoptTrainer

    reference = type(trained)(trained.config).double()
    reference.load_state_dict(trained.state_dict())
    opt = HF_METHODS[method](trained)
    args = hf_args(transformers, tmp_path, 2)
    args.per_device_train_batch_size = BATCH // 3
    args.gradient_accumulation_steps = 3
    trainer = GramoptTrainer(model=trained, args=args, train_dataset=Sequences(), optimizers=(opt, None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train()
    assert not [w for w in caught if "gramopt" in str(w.message)], [str(w.message) for w in caught]
    assert result.global_step == 2 and opt.steps_taken == 2
    ref_opt = HF_METHODS[method](reference)
    losses = plain_loop_steps(reference, ref_opt, Sequences().batch(), 2)
    assert_same_parameters(trained, reference, atol=1e-9)
    assert result.training_loss == pytest.approx(sum(losses) / 2, rel=1e-6)  # (the Trainer sums in float32)
    opt.close()
    ref_opt.close()


@pytest.mark.parametrize("method", ["seng", "fngd", "ggn"])
def test_gramopt_trainer_logs_the_real_gradient_norm_or_none(method, tmp_path):
    """SENG's logged grad_norm is the norm of the mean loss's gradient (its .grad, which its
    step reads), here the plain loop's at the first step; GGN and FNGD leave .grad of their
    layers unset, so no grad_norm is logged (not the 0 or the partial norm of .grad)."""
    transformers, trained = tiny_bert()
    from gramopt.integrations.huggingface import GramoptTrainer

    reference = type(trained)(trained.config).double()
    reference.load_state_dict(trained.state_dict())
    opt = HF_METHODS[method](trained)
    args = hf_args(transformers, tmp_path, 2)
    args.logging_strategy, args.logging_steps = "steps", 1
    trainer = GramoptTrainer(model=trained, args=args, train_dataset=Sequences(), optimizers=(opt, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    if method != "seng":
        assert not any("grad_norm" in entry for entry in trainer.state.log_history), trainer.state.log_history
        return
    if not hasattr(transformers.Trainer, "_get_grad_norm"):
        pytest.skip("this transformers logs grad_norm only when it clips .grad itself")
    batch = Sequences().batch()
    reference(**batch).loss.backward()
    expected = float(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters() if p.grad is not None]))
    )
    assert expected > 0 and steps[0]["grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert steps[1]["grad_norm"] > 0 and steps[1]["grad_norm"] != steps[0]["grad_norm"]
    opt.close()


def test_gramopt_trainer_adapts_ggns_damping_with_a_model_output(tmp_path):
    """A BERT model returns a ModelOutput: GGN's damping adaptation re-runs it and takes
    ``.logits`` as the step did, so the damping adapts (no warning) exactly as in a plain
    loop on the whole batch."""
    transformers, trained = tiny_bert()
    from gramopt.integrations.huggingface import GramoptTrainer

    reference = type(trained)(trained.config).double()
    reference.load_state_dict(trained.state_dict())
    rule = gramopt.AdaptiveDamping(every=1, min_damping=1e-3)
    make = lambda m: gramopt.GGN(m, lr=0.5, damping=1.0, loss="cross_entropy", damping_adaptation=rule)  # noqa: E731
    opt = make(trained)
    args = hf_args(transformers, tmp_path, 3)
    trainer = GramoptTrainer(model=trained, args=args, train_dataset=Sequences(), optimizers=(opt, None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "damping" in str(w.message)], [str(w.message) for w in caught]
    ref_opt = make(reference)
    plain_loop_steps(reference, ref_opt, Sequences().batch(), 3)
    assert opt.extra_state["damping_adaptation"]["last_ratio"] is not None
    assert opt.extra_state["damping_adaptation"]["last_ratio"] == pytest.approx(
        ref_opt.extra_state["damping_adaptation"]["last_ratio"], rel=1e-6
    )
    assert opt.damping == pytest.approx(ref_opt.damping, rel=1e-9) and opt.damping != 1.0  # it adapted
    assert_same_parameters(trained, reference, atol=1e-9)
    opt.close()
    ref_opt.close()


def test_gramopt_trainer_max_grad_norm_clips_the_update(tmp_path):
    """max_grad_norm becomes the optimizer's max_update_norm: the run equals a plain loop
    with max_update_norm=c (a c small enough to clip every step), the Trainer clips no
    .grad (GGN would warn), and the caller's args keep their max_grad_norm."""
    transformers, trained = tiny_bert()
    from gramopt.integrations.huggingface import GramoptTrainer

    reference = type(trained)(trained.config).double()
    reference.load_state_dict(trained.state_dict())
    unclipped = type(trained)(trained.config).double()
    unclipped.load_state_dict(trained.state_dict())
    opt = HF_METHODS["ggn"](trained)
    args = hf_args(transformers, tmp_path, 2)
    args.max_grad_norm = 0.05
    trainer = GramoptTrainer(model=trained, args=args, train_dataset=Sequences(), optimizers=(opt, None))
    assert opt.max_update_norm == 0.05 and args.max_grad_norm == 0.05 and trainer.args.max_grad_norm == 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "gramopt" in str(w.message)], [str(w.message) for w in caught]
    batch = Sequences().batch()
    ref_opt = HF_METHODS["ggn"](reference, max_update_norm=0.05)
    plain_loop_steps(reference, ref_opt, batch, 2)
    assert_same_parameters(trained, reference, atol=1e-9)
    free_opt = HF_METHODS["ggn"](unclipped)
    plain_loop_steps(unclipped, free_opt, batch, 2)  # the clip took effect: without it, another result
    moved = {
        n: (p - q).abs().max() for (n, p), q in zip(unclipped.named_parameters(), reference.parameters(), strict=True)
    }
    assert max(moved.values()) > 1e-6
    for o in (opt, ref_opt, free_opt):
        o.close()


def test_gramopt_trainer_refuses_a_conflicting_clip_and_other_optimizers(tmp_path):
    transformers, model = tiny_bert()
    from gramopt.integrations.huggingface import GramoptTrainer

    data = Sequences()
    opt = gramopt.GGN(model, lr=0.1, damping=1.0, loss="cross_entropy", max_update_norm=2.0)
    clipped = hf_args(transformers, tmp_path, 1)
    clipped.max_grad_norm = 1.0
    with pytest.raises(ValueError, match="already has max_update_norm=2.0"):
        GramoptTrainer(model=model, args=clipped, train_dataset=data, optimizers=(opt, None))
    clipped.max_grad_norm = float("nan")
    with pytest.raises(ValueError, match="max_grad_norm must be finite"):
        GramoptTrainer(model=model, args=clipped, train_dataset=data, optimizers=(opt, None))
    assert opt.max_update_norm == 2.0
    GramoptTrainer(model=model, args=hf_args(transformers, tmp_path, 1), train_dataset=data, optimizers=(opt, None))
    assert opt.max_update_norm == 2.0  # max_grad_norm=0: the optimizer's own clip stays
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="needs a gramopt optimizer"):
        GramoptTrainer(model=model, args=hf_args(transformers, tmp_path, 1), train_dataset=data, optimizers=(sgd, None))
    opt.close()


def test_bert_default_position_ids_are_a_clear_error_for_per_sample_methods():
    _, model = tiny_bert()
    opt = gramopt.SENG(model, lr=0.1, damping=1.0)
    batch = Sequences().batch()
    del batch["position_ids"]
    with pytest.raises(gramopt.CaptureError, match="position_embeddings saw a batch of 1"):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    opt.close()
