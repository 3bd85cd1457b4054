"""Drop-rate schedules in training frameworks: PyTorch Lightning and the Hugging Face Trainer.

Each callback steps one :mod:`fxsd.schedulers` schedule once per *optimizer* step (it follows the
framework's global step, so gradient accumulation is respected), logs as ``drop_rate`` the
model-wide rate the logged step trained with (not the rate set for the step after it), and saves
and restores the schedule and the gates' random stream with the framework's checkpoint.

>>> import fxsd.callbacks  # imports without Lightning or transformers installed

Both classes derive from the framework's callback class when the framework is installed
(``lightning.pytorch.Callback``, else ``pytorch_lightning.Callback``;
``transformers.TrainerCallback``), so importing this module imports those frameworks if they are
there. Without them the classes
still exist (deriving from ``object``), so code that names them imports everywhere.

Under DDP a dropped branch's parameters get no gradient: Lightning needs
``strategy=DDPStrategy(find_unused_parameters=True)`` (or ``"ddp_find_unused_parameters_true"``),
the Trainer ``TrainingArguments(ddp_find_unused_parameters=True)``. See docs/training.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fxsd.training import get_rng_state, set_rng_state

__all__ = ["LightningCallback", "TransformersCallback"]

try:
    from lightning.pytorch import Callback as _LightningBase
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback as _LightningBase
    except ImportError:
        _LightningBase = object

try:
    from transformers import TrainerCallback as _TransformersBase
except ImportError:  # pragma: no cover - depends on what is installed
    _TransformersBase = object

STATE_FILE = "fxsd_schedule.pt"


def _catch_up(schedule: Any, global_step: int) -> None:
    """Step ``schedule`` until it has taken ``global_step`` steps."""
    while schedule.step_count < global_step:
        schedule.step()


def _state(schedule: Any) -> dict[str, Any]:
    return {"schedule": schedule.state_dict(), "rng": get_rng_state(schedule.model)}


def _load(schedule: Any, state: dict[str, Any]) -> None:
    schedule.load_state_dict(state["schedule"])
    set_rng_state(schedule.model, state["rng"])


class LightningCallback(_LightningBase):  # type: ignore[misc, valid-type]
    """Step an fxsd schedule in a ``lightning.pytorch.Trainer``.

    Args:
        schedule: a :class:`~fxsd.DropSchedule` (``DropWarmup``, ``progressive_layer_drop``, …)
            of the model the ``LightningModule`` trains.
        log_name: the name the rate is logged under (``None``: not logged).

    Example::

        model = fxsd.stochastic_depth(net, 0.2)
        schedule = fxsd.DropWarmup(model, total_steps=10_000, warmup=0.1)
        trainer = lightning.pytorch.Trainer(callbacks=[fxsd.callbacks.LightningCallback(schedule)])

    The schedule's position and the gates' random stream are part of the checkpoint
    (``Callback.state_dict``), so ``trainer.fit(..., ckpt_path=...)`` resumes both.
    """

    def __init__(self, schedule: Any, log_name: str | None = "drop_rate") -> None:
        super().__init__()
        self.schedule = schedule
        self.log_name = log_name

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        _catch_up(self.schedule, trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        trained = self.schedule.get_last_rate()  # the batch ran at it; catching up moves on
        _catch_up(self.schedule, trainer.global_step)
        if self.log_name:
            pl_module.log(self.log_name, trained, on_step=True, on_epoch=False, prog_bar=False)

    def state_dict(self) -> dict[str, Any]:
        return _state(self.schedule)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _load(self.schedule, state_dict)


class TransformersCallback(_TransformersBase):  # type: ignore[misc, valid-type]
    """Step an fxsd schedule in a Hugging Face ``transformers.Trainer``.

    Args:
        schedule: a :class:`~fxsd.DropSchedule` of the model the Trainer trains.
        log_name: the key the rate is added to the Trainer's logs under (``None``: not logged).

    Example::

        model = fxsd.stochastic_depth(hf_model, 0.2, example_kwargs=batch)
        schedule = fxsd.progressive_layer_drop(model, theta_bar=0.5, total_steps=10_000)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       callbacks=[fxsd.callbacks.TransformersCallback(schedule)])

    At every checkpoint the schedule's position and the gates' random stream are written to
    ``checkpoint-<step>/fxsd_schedule.pt``; ``trainer.train(resume_from_checkpoint=...)``
    reads them back (a checkpoint without the file: the schedule is stepped to the restored
    global step).
    """

    def __init__(self, schedule: Any, log_name: str | None = "drop_rate") -> None:
        super().__init__()
        self.schedule = schedule
        self.log_name = log_name
        self._trained: float | None = None  # the rate the last optimizer step trained with

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if state.global_step and os.path.exists(path):
            _load(self.schedule, torch.load(path, weights_only=True))
        _catch_up(self.schedule, state.global_step)
        self._trained = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._trained = self.schedule.get_last_rate()  # on_log comes after the catching up
        _catch_up(self.schedule, state.global_step)  # called once per optimizer step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(_state(self.schedule), os.path.join(folder, STATE_FILE))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> Any:
        if self.log_name and logs is not None:
            trained = self._trained
            logs[self.log_name] = self.schedule.get_last_rate() if trained is None else trained
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1][self.log_name] = logs[self.log_name]
