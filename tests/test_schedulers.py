"""Schedules over training time and depth, against their formulas; the framework callbacks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import fxsd


class Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class Net(nn.Module):
    def __init__(self, depth=6, dim=8):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        return self.head(self.blocks(x))


def _rates(model):
    return [g.drop_rate for g in fxsd.gates(model)]


def test_exponential_distribution_is_layerskip():
    model = fxsd.stochastic_depth(Net(depth=6), 0.4, distribution="exponential")
    L = 6
    expected = [0.4 * (math.exp(d * math.log(2) / (L - 1)) - 1) for d in range(L)]  # d = 0..L-1
    assert _rates(model) == pytest.approx(expected, abs=1e-12)
    assert _rates(model)[0] == 0.0 and _rates(model)[-1] == pytest.approx(0.4)
    one = fxsd.stochastic_depth(Net(depth=1), 0.4, distribution="exponential")
    assert _rates(one) == [0.0]


@pytest.mark.parametrize("step", [0, 1, 7, 50, 400])
def test_drop_schedule_scales_every_base_rate(step):
    model = fxsd.stochastic_depth(Net(), 0.3, distribution="linear")
    base = _rates(model)
    schedule = fxsd.DropSchedule(model, lambda t: 0.5 + 0.5 * math.cos(t / 100))
    for _ in range(step):
        schedule.step()
    factor = 0.5 + 0.5 * math.cos(step / 100)
    assert _rates(model) == pytest.approx([b * factor for b in base])
    assert schedule.get_last_rate() == pytest.approx(0.3 * factor)
    assert fxsd.get_drop_rate(model) == pytest.approx(0.3 * factor)


def test_exponential_with_a_time_curriculum():
    model = fxsd.stochastic_depth(Net(depth=4), 0.2, distribution="exponential")
    schedule = fxsd.DropSchedule(model, lambda t: min(1.0, t / 10))
    for step in range(15):
        expected = [min(1.0, step / 10) * 0.2 * (2 ** (d / 3) - 1) for d in range(4)]
        assert _rates(model) == pytest.approx(expected, abs=1e-12), step
        schedule.step()


def test_drop_schedule_state_round_trip():
    model = fxsd.stochastic_depth(Net(), 0.3)
    schedule = fxsd.DropSchedule(model, lambda t: min(1.0, t / 20))
    for _ in range(7):
        schedule.step()
    state = schedule.state_dict()
    other = fxsd.stochastic_depth(Net(), 0.3)
    resumed = fxsd.DropSchedule(other, lambda t: min(1.0, t / 20))
    resumed.load_state_dict(state)
    assert resumed.step_count == 7 and _rates(other) == pytest.approx(_rates(model))


def test_drop_warmup_is_a_drop_schedule():
    model = fxsd.stochastic_depth(Net(), 0.2)
    warmup = fxsd.DropWarmup(model, total_steps=100, warmup=0.1)
    assert isinstance(warmup, fxsd.DropSchedule)
    seen = []
    for _ in range(12):
        seen.append(warmup.get_last_rate())
        warmup.step()
    assert seen == pytest.approx([0.2 * min(1, s / 10) for s in range(12)])
    assert set(warmup.state_dict()) == {"step_count", "target", "total_steps", "warmup"}


@pytest.mark.parametrize(("theta_bar", "gamma"), [(0.5, 0.01), (0.7, 0.1)])
@pytest.mark.parametrize("step", [0, 1, 10, 100, 1000])
def test_progressive_layer_drop_formula(theta_bar, gamma, step):
    # the model's own rates (0.3, uniform) are replaced by PLD's
    model = fxsd.stochastic_depth(Net(depth=5), 0.3, distribution="uniform")
    pld = fxsd.progressive_layer_drop(model, theta_bar=theta_bar, gamma=gamma)
    for _ in range(step):
        pld.step()
    theta = (1 - theta_bar) * math.exp(-gamma * step) + theta_bar
    L = 5
    assert _rates(model) == pytest.approx([(d / L) * (1 - theta) for d in range(1, L + 1)])
    assert pld.get_last_rate() == pytest.approx(1 - theta)


def test_progressive_layer_drop_defaults_and_state():
    model = fxsd.stochastic_depth(Net(), 0.1)
    pld = fxsd.progressive_layer_drop(model, total_steps=1000)
    assert pld.gamma == pytest.approx(0.1) and pld.get_last_rate() == 0.0
    for _ in range(30):
        pld.step()
    other = fxsd.stochastic_depth(Net(), 0.1)
    resumed = fxsd.progressive_layer_drop(other, total_steps=5)
    resumed.load_state_dict(pld.state_dict())
    assert _rates(other) == pytest.approx(_rates(model))
    with pytest.raises(fxsd.InvalidArgumentError, match="gamma= or total_steps="):
        fxsd.progressive_layer_drop(model)


def test_schedule_errors():
    model = fxsd.stochastic_depth(Net(), 0.1)
    with pytest.raises(fxsd.InvalidTypeError, match="callable"):
        fxsd.DropSchedule(model, 0.5)
    with pytest.raises(fxsd.InvalidArgumentError, match="no fxsd gates"):
        fxsd.DropSchedule(Net(), lambda t: 1.0)
    schedule = fxsd.DropSchedule(model, lambda t: -1.0 if t else 1.0)
    with pytest.raises(fxsd.InvalidArgumentError, match="factors must be numbers >= 0"):
        schedule.step()


def test_a_factor_past_rate_1_is_refused_not_capped():
    model = fxsd.stochastic_depth(Net(), 0.4, distribution="uniform")
    schedule = fxsd.DropSchedule(model, lambda t: 1.0 + t)
    schedule.step()  # 0.4 x 2 = 0.8
    with pytest.raises(fxsd.InvalidArgumentError,
                       match=r"fn\(2\) returned 3: site 'blocks.0.residual_gate' would drop at 1.2 "
                             r"\(base rate 0.4 x 3\), above 1; make fn's factors at most 2.5"):
        schedule.step()
    assert schedule.step_count == 1 and _rates(model) == pytest.approx([0.8] * 6)
    # exactly 1, from a factor that rounds a hair past it, is a rate
    linear = fxsd.stochastic_depth(Net(), 0.3)
    assert fxsd.DropSchedule(linear, lambda t: 1 / 0.3).get_last_rate() == 1.0
    assert _rates(linear)[-1] == 1.0


def test_rng_state_of_a_model_with_other_gates_is_refused():
    six, four = fxsd.stochastic_depth(Net(depth=6), 0.2), fxsd.stochastic_depth(Net(depth=4), 0.2)
    state = fxsd.get_rng_state(six)
    assert state["num_gates"] == 6
    with pytest.raises(fxsd.InvalidArgumentError, match="model with 6 gates, but this model has 4"):
        fxsd.set_rng_state(four, state)
    fxsd.set_rng_state(fxsd.stochastic_depth(Net(depth=6), 0.5, seed=1), state)  # same sites


def test_callbacks_import_without_frameworks():
    import subprocess
    import sys

    code = ("import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None; "
            "sys.modules['transformers'] = None; import fxsd.training.callbacks as c; "
            "print(c.LightningCallback.__mro__[1].__name__, "
            "c.TransformersCallback.__mro__[1].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["object", "object"]


# --------------------------------------------------------------------------------------------
# Frameworks: a few real optimizer steps each, with gradient accumulation, saved and resumed.
# --------------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    """Equality of nested states holding tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _data(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from fxsd.training.callbacks import LightningCallback

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.trained, self.logged = [], []  # per batch: the rate it ran at, the rate logged

        def training_step(self, batch, _):
            x, y = batch
            self.trained.append(fxsd.get_drop_rate(self.net))
            return nn.functional.cross_entropy(self.net(x), y)

        def log(self, name, value, *args, **kwargs):
            if name == "drop_rate":
                self.logged.append(value)
            return super().log(name, value, *args, **kwargs)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(max_steps, ckpt=None):
        torch.manual_seed(0)
        model = fxsd.stochastic_depth(Net(), 0.4)
        schedule = fxsd.DropWarmup(model, total_steps=10, warmup=0.5)
        callback = LightningCallback(schedule)
        x, y = _data()
        loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=2)
        trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, callbacks=[callback],
                             accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path)
        module = Module(model)
        trainer.fit(module, loader, ckpt_path=ckpt)
        trainer.module = module
        return trainer, schedule, model

    trainer, schedule, model = run(3)
    assert trainer.global_step == 3 and schedule.step_count == 3  # 6 batches, 3 optimizer steps
    assert schedule.get_last_rate() == pytest.approx(0.4 * 3 / 5)  # set for the next step
    # each batch logs the rate it trained with: steps 0, 1, 2 of the warmup, two batches each
    module = trainer.module
    assert module.logged == pytest.approx(module.trained)
    assert module.trained == pytest.approx([0.4 * s / 5 for s in (0, 0, 1, 1, 2, 2)])
    assert trainer.callback_metrics["drop_rate"].item() == pytest.approx(0.4 * 2 / 5)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved_rng = fxsd.get_rng_state(model)

    restored = {}
    original = LightningCallback.load_state_dict

    def spy(self, state):
        original(self, state)
        restored["step"] = self.schedule.step_count
        restored["rng"] = fxsd.get_rng_state(self.schedule.model)

    LightningCallback.load_state_dict = spy
    try:
        trainer, schedule, _ = run(5, ckpt=str(path))
    finally:
        LightningCallback.load_state_dict = original
    assert restored["step"] == 3 and _same(restored["rng"], saved_rng)
    assert trainer.global_step == 5 and schedule.step_count == 5
    assert schedule.get_last_rate() == pytest.approx(0.4)


def test_transformers_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fxsd.training.callbacks import STATE_KEY, TransformersCallback, _decoded

    class Classifier(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, labels=None):
            trained.append(fxsd.get_drop_rate(self.net))
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    trained = []  # the rate every forward ran at

    x, y = _data()
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def run(max_steps, resume=None):
        torch.manual_seed(0)
        model = fxsd.stochastic_depth(Net(), 0.4)
        pld = fxsd.progressive_layer_drop(model, theta_bar=0.5, gamma=0.2)
        callback = TransformersCallback(pld)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, save_steps=2, logging_steps=1, report_to=[],
            use_cpu=True, disable_tqdm=True, learning_rate=0.1)
        trainer = transformers.Trainer(model=Classifier(model), args=args, train_dataset=data,
                                       callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, pld, model

    trainer, pld, model = run(4)
    assert trainer.state.global_step == 4 and pld.step_count == 4
    assert pld.get_last_rate() == pytest.approx(0.5 - 0.5 * math.exp(-0.2 * 4))
    logged = [h["drop_rate"] for h in trainer.state.log_history if "drop_rate" in h]
    # step k is logged with the rate its two forwards (gradient accumulation) ran at
    assert trained == pytest.approx([0.5 - 0.5 * math.exp(-0.2 * s) for s in (0, 0, 1, 1, 2, 2,
                                                                               3, 3)])
    assert logged[:4] == pytest.approx(trained[::2])
    entry = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    saved = _decoded(entry["stateful_callbacks"][STATE_KEY], 2)  # in the checkpoint's own state
    assert saved["schedule"]["step_count"] == 2

    loaded = {}
    original = TransformersCallback.on_train_begin

    def spy(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        loaded["step"] = self.schedule.step_count
        loaded["rng"] = fxsd.get_rng_state(self.schedule.model)

    TransformersCallback.on_train_begin = spy
    try:
        trainer, pld, _ = run(4, resume=str(tmp_path / "checkpoint-2"))
    finally:
        TransformersCallback.on_train_begin = original
    assert loaded["step"] == 2 and _same(loaded["rng"], saved["rng"])
    assert pld.step_count == 4
