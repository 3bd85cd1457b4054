"""Resuming the drop stream from the checkpoint actually resumed, wherever it lives.

A run interrupted at a checkpoint and resumed from it must draw the drop decisions, and so train
the losses, of the uninterrupted run — also when the checkpoint was moved or copied and the
resumed run writes to another ``output_dir`` — and a checkpoint without fxsd's state must say so.
Tiny Llama on CPU for the HF Trainer, a small MLP for Lightning.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from torch import nn

import fxsd
from fxsd.errors import ResumeWarning
from fxsd.training.callbacks import (
    STATE_FILE,
    STATE_KEY,
    LightningCallback,
    TransformersCallback,
    _decoded,
)

VOCAB = 64
STEPS, SAVE_AT = 6, 3


def _ids(batch: int, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _tf():
    pytest.importorskip("accelerate")  # the Trainer needs it
    return pytest.importorskip("transformers")


def _llama() -> nn.Module:
    tf = _tf()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=32, pad_token_id=0)
    model = tf.LlamaForCausalLM(config)
    return fxsd.stochastic_depth(model, 0.5, mode="block", seed=0,
                                 example_kwargs={"input_ids": _ids(2)})


def _train(output_dir, resume=None):
    """Train a fresh gated Llama; returns ({step: drop decisions of its forward}, {step: loss})."""
    tf, model = _tf(), _llama()
    schedule = fxsd.DropWarmup(model, total_steps=STEPS, warmup=0.5)
    decisions = []

    def record(module, args, kwargs, output):
        if module.training:
            decisions.append(tuple(gate.dropped for gate in fxsd.gates(model)))

    model.register_forward_hook(record, with_kwargs=True)
    rows = _ids(2 * STEPS, seed=1)
    data = [{"input_ids": row, "labels": row} for row in rows]
    args = tf.TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_AT, logging_steps=1,
        per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True,
        disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data,
                         callbacks=[TransformersCallback(schedule)])
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    steps = range(trainer.state.global_step - len(decisions) + 1, trainer.state.global_step + 1)
    assert len(decisions) == len(steps)  # one training forward per step
    return dict(zip(steps, decisions)), losses


def test_trainer_resumed_from_a_copied_checkpoint_keeps_the_drop_stream(tmp_path):
    whole_decisions, whole_losses = _train(tmp_path / "run")
    assert len(whole_decisions) == STEPS and any(any(d) for d in whole_decisions.values())
    # the checkpoint moves elsewhere; the original run's folder is gone
    copy = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "run" / f"checkpoint-{SAVE_AT}", copy)
    shutil.rmtree(tmp_path / "run")
    decisions, losses = _train(tmp_path / "new_output_dir", resume=str(copy))
    later = range(SAVE_AT + 1, STEPS + 1)
    assert list(decisions) == list(later)
    # the drop decisions are a function of the restored stream: they must be the same ones
    assert decisions == {s: whole_decisions[s] for s in later}
    assert {s: losses[s] for s in later} == {s: whole_losses[s] for s in later}


def test_trainer_resume_without_fxsd_state_warns(tmp_path):
    whole, _ = _train(tmp_path / "run")
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    entry = state["stateful_callbacks"].pop(STATE_KEY, None)  # as if saved without the callback
    path.write_text(json.dumps(state))
    with pytest.warns(ResumeWarning, match=f"resuming at step {SAVE_AT}.*holds no fxsd state"):
        decisions, _ = _train(tmp_path / "new", resume=str(checkpoint))
    later = list(range(SAVE_AT + 1, STEPS + 1))
    assert list(decisions) == later  # trains on, the schedule caught up
    # fxsd 0.1.0 kept the state in a file of the checkpoint folder: still read from output_dir
    torch.save(_decoded(entry, SAVE_AT), checkpoint / STATE_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        decisions, _ = _train(tmp_path / "run", resume=str(checkpoint))
    assert decisions == {s: whole[s] for s in later}


def test_lightning_resume_without_fxsd_state_warns(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = fxsd.stochastic_depth(
                nn.Sequential(*[Residual() for _ in range(3)], nn.Linear(8, 2)), 0.5, seed=0)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps, ckpt=None, with_callback=True):
        torch.manual_seed(0)
        module = Module()
        schedule = fxsd.DropWarmup(module.net, total_steps=4, warmup=0.5)
        callbacks = [LightningCallback(schedule)] if with_callback else []
        data = list(zip(torch.randn(8, 8), torch.randint(0, 2, (8,))))
        trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, accelerator="cpu",
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2), ckpt_path=ckpt)
        return trainer, schedule

    trainer, _ = fit(2, with_callback=False)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.warns(ResumeWarning, match="plain.ckpt, which holds no fxsd state"):
        _, schedule = fit(4, ckpt=str(tmp_path / "plain.ckpt"))
    assert schedule.step_count == 4
    trainer, _ = fit(2)
    trainer.save_checkpoint(tmp_path / "fxsd.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # its state is there: no warning
        _, schedule = fit(4, ckpt=str(tmp_path / "fxsd.ckpt"))
    assert schedule.step_count == 4


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.relu(self.fc(x))
