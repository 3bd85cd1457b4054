"""Drop-rate schedules in training frameworks: PyTorch Lightning and the Hugging Face Trainer.

Each callback steps one :mod:`fxsd.training.schedulers` schedule once per *optimizer* step (it
follows the framework's global step, so gradient accumulation is respected), logs as ``drop_rate``
the model-wide rate the logged step trained with (not the rate set for the step after it), and saves
and restores the schedule and the gates' random stream with the framework's checkpoint.

>>> import fxsd.training.callbacks  # imports without Lightning or transformers installed

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

import base64
import io
import os
import warnings
from typing import Any

import torch

from fxsd.errors import ResumeWarning
from fxsd.record import Schedule
from fxsd.runtime.accessors import get_rng_state, set_rng_state

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

STATE_KEY = "fxsd"  # the entry of trainer_state.json's ``stateful_callbacks`` holding the state
STATE_FILE = "fxsd_schedule.pt"  # where fxsd 0.1.0 kept it, in the checkpoint folder: still read
TRAINER_STATE = "trainer_state.json"


def _catch_up(schedule: Schedule, global_step: int) -> None:
    """Step ``schedule`` until it has taken ``global_step`` steps."""
    while schedule.step_count < global_step:
        schedule.step()


def _state(schedule: Schedule) -> dict[str, Any]:
    return {"schedule": schedule.state_dict(), "rng": get_rng_state(schedule.model)}


def _load(schedule: Schedule, state: dict[str, Any]) -> None:
    schedule.load_state_dict(state["schedule"])
    set_rng_state(schedule.model, state["rng"])


def _warn_no_state(where: str, step: int) -> None:
    warnings.warn(ResumeWarning(
        f"resuming at step {step} from {where}, which holds no fxsd state: the drop schedule is "
        "stepped to that step, but the drop decisions will differ from an uninterrupted run's. "
        "Save the checkpoint with the fxsd callback in the trainer's callbacks to resume them"),
        stacklevel=3)


def _encoded(schedule: Schedule, step: int) -> dict[str, Any]:
    """:func:`_state` as a JSON value: the bytes ``torch.save`` writes, in base64."""
    buffer = io.BytesIO()
    torch.save(_state(schedule), buffer)
    return {"global_step": step, "state": base64.b64encode(buffer.getvalue()).decode("ascii")}


def _decoded(entry: Any, step: int) -> dict[str, Any] | None:
    """The state :func:`_encoded` stored at ``step`` (``None``: none, or one of another step)."""
    if not isinstance(entry, dict) or entry.get("global_step") != step:
        return None
    data = base64.b64decode(entry["state"])
    return torch.load(io.BytesIO(data), weights_only=True)


def _legacy_file(args: Any, step: int) -> dict[str, Any] | None:
    """The state fxsd 0.1.0 wrote to ``checkpoint-<step>/fxsd_schedule.pt``, where it can be
    found: under ``output_dir`` or at ``TrainingArguments.resume_from_checkpoint``."""
    folders = [os.path.join(args.output_dir, f"checkpoint-{step}")]
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        folders.append(args.resume_from_checkpoint)
    for folder in folders:
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            state = torch.load(path, weights_only=True)
            if state["schedule"].get("step_count") == step:
                return state
    return None


class LightningCallback(_LightningBase):  # type: ignore[misc, valid-type]
    """Step an fxsd schedule in a ``lightning.pytorch.Trainer``.

    Args:
        schedule: a :class:`~fxsd.DropSchedule` (``DropWarmup``, ``progressive_layer_drop``, …)
            of the model the ``LightningModule`` trains.
        log_name: the name the rate is logged under (``None``: not logged).

    Example::

        model = fxsd.stochastic_depth(net, 0.2)
        schedule = fxsd.DropWarmup(model, total_steps=10_000, warmup=0.1)
        trainer =
        lightning.pytorch.Trainer(callbacks=[fxsd.training.callbacks.LightningCallback(schedule)])

    The schedule's position and the gates' random stream are part of the checkpoint file itself
    (``Callback.state_dict``, under the checkpoint's ``callbacks`` entry), so
    ``trainer.fit(..., ckpt_path=...)`` resumes both wherever the file is. A checkpoint without
    that entry warns :class:`ResumeWarning` and steps the schedule to the restored global step.
    """

    def __init__(self, schedule: Schedule, log_name: str | None = "drop_rate") -> None:
        super().__init__()
        self.schedule = schedule
        self.log_name = log_name
        self._restored = False  # load_state_dict ran for the fit now starting

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning restores callbacks (load_state_dict) before this hook, and only from a
        # checkpoint holding their entry.
        if getattr(trainer, "ckpt_path", None) is not None and not self._restored:
            _warn_no_state(str(trainer.ckpt_path), trainer.global_step)
        self._restored = False
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
        self._restored = True


class TransformersCallback(_TransformersBase):  # type: ignore[misc, valid-type]
    """Step an fxsd schedule in a Hugging Face ``transformers.Trainer``.

    Args:
        schedule: a :class:`~fxsd.DropSchedule` of the model the Trainer trains.
        log_name: the key the rate is added to the Trainer's logs under (``None``: not logged).

    Example::

        model = fxsd.stochastic_depth(hf_model, 0.2, example_kwargs=batch)
        schedule = fxsd.progressive_layer_drop(model, theta_bar=0.5, total_steps=10_000)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       callbacks=[fxsd.training.callbacks.TransformersCallback(schedule)])

    At every checkpoint the schedule's position and the gates' random stream are added to the
    checkpoint's ``trainer_state.json`` (``stateful_callbacks["fxsd"]``), which the Trainer
    reads from the folder it resumes and hands to the callback: so
    ``trainer.train(resume_from_checkpoint=path)`` resumes the drop decisions wherever ``path``
    is (moved, copied, another ``output_dir``). A resumed checkpoint without that entry (nor the
    ``fxsd_schedule.pt`` file older versions wrote) warns :class:`ResumeWarning` and steps the
    schedule to the restored global step.
    """

    def __init__(self, schedule: Schedule, log_name: str | None = "drop_rate") -> None:
        super().__init__()
        self.schedule = schedule
        self.log_name = log_name
        self._trained: float | None = None  # the rate the last optimizer step trained with

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # A run starts at a nonzero step only when the Trainer loaded trainer_state.json from the
        # checkpoint it resumes, wherever that lives: the state handed in here is that file's.
        step = state.global_step
        if step:
            saved = _decoded((state.stateful_callbacks or {}).get(STATE_KEY), step)
            if saved is None:
                saved = _legacy_file(args, step)
            if saved is None:
                _warn_no_state("the checkpoint resumed (no entry in its trainer_state.json)", step)
            else:
                _load(self.schedule, saved)
        _catch_up(self.schedule, step)
        self._trained = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._trained = self.schedule.get_last_rate()  # on_log comes after the catching up
        _catch_up(self.schedule, state.global_step)  # called once per optimizer step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # The Trainer has just written the checkpoint's trainer_state.json from ``state``: add the
        # entry and write the file again (the Trainer's own callback state, ExportableState,
        # re-creates a callback from constructor arguments, which cannot hold a model).
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        state.stateful_callbacks[STATE_KEY] = _encoded(self.schedule, state.global_step)
        if args.should_save and os.path.isfile(os.path.join(folder, TRAINER_STATE)):
            state.save_to_json(os.path.join(folder, TRAINER_STATE))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> Any:
        if self.log_name and logs is not None:
            trained = self._trained
            logs[self.log_name] = self.schedule.get_last_rate() if trained is None else trained
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1][self.log_name] = logs[self.log_name]
