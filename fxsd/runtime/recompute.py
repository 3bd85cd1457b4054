"""Gate decisions under activation checkpointing: a recomputed forward replays, never redraws.

``torch.utils.checkpoint`` (and ``apply_activation_checkpointing``, which uses it) runs a block's
forward a second time during backward to rebuild the activations it did not keep. A gate inside
the block runs again too. Drawing a new decision there would rebuild a different computation than
the one whose gradient is being taken; torch restores its own RNG state for the recomputation,
but fxsd's gates draw from their own generator. So the gate records each decision it makes in a
checkpointed forward on the checkpoint's frame, and a recomputation of that frame reads them back
in the same order (the recomputed forward runs the same gates in the same order, since it replays
the same decisions).

Non-reentrant checkpointing (``use_reentrant=False``: the default of ``checkpoint_wrapper`` and
of Hugging Face's ``activation_checkpointing_enable()``) is supported. Reentrant checkpointing
hides which forward a recomputation replays; a gate that finds itself running inside backward
without a checkpoint frame raises :class:`~fxsd.GraphError` instead of guessing.

:func:`checkpointing` says whether a module's own call is checkpointed, so that the rewrite can
warn when it must copy such a module's code into another module's graph (where it would no
longer be checkpointed).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from fxsd.errors import GraphError

__all__ = ["decide", "checkpointing"]

_LOG = "_fxsd_decisions"
_CURSOR = "_fxsd_replay"


def _current() -> tuple[Any, int | None] | None:
    """``(frame, None)`` inside a checkpointed forward, ``(frame, graph task)`` inside its
    recomputation, ``None`` elsewhere (the innermost checkpoint counts)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return None
    pack = inspect.unwrap(hooks[0])
    names = pack.__code__.co_freevars
    cells = dict(zip(names, pack.__closure__ or ()))
    if "frame" in cells:
        return cells["frame"].cell_contents, None
    if "target_frame_ref" in cells and "gid" in cells:
        frame = cells["target_frame_ref"].cell_contents()
        return (frame, cells["gid"].cell_contents) if frame is not None else None
    return None  # someone else's saved-tensor hooks (e.g. offloading): not a checkpoint


def decide(gate: torch.nn.Module, draw: Callable[[], Any]) -> Any:
    """``draw()`` for ``gate``, recorded under a checkpointed forward and replayed in its
    recomputation."""
    where = _current()
    in_backward = torch._C._current_graph_task_id() != -1
    if where is None or (where[1] is None and in_backward):
        if in_backward:
            raise GraphError(
                f"{gate!r} ran inside backward outside a recomputation fxsd can follow "
                "(reentrant activation checkpointing, or a checkpoint nested in a recomputed "
                "one): its decision could not be replayed. Use non-reentrant checkpointing "
                "(use_reentrant=False; checkpoint_wrapper's default CheckpointImpl.NO_REENTRANT, "
                "and Hugging Face's activation_checkpointing_enable() default)")
        return draw()
    frame, graph_task = where
    log = frame.__dict__.setdefault(_LOG, [])
    if graph_task is None:
        decision = draw()
        log.append((id(gate), decision))
        return decision
    cursors = frame.__dict__.setdefault(_CURSOR, {})
    position = cursors.get(graph_task, 0)
    if position >= len(log) or log[position][0] != id(gate):
        raise GraphError(f"{gate!r}: the recomputed forward ran other gates than the original "
                         "one; its decision cannot be replayed")
    cursors[graph_task] = position + 1
    return log[position][1]


def checkpointing(module: torch.nn.Module) -> str | None:
    """What checkpoints ``module``'s own call, described for a message, or ``None``.

    torch's activation-checkpoint wrappers (``CheckpointWrapper``) checkpoint their call; a
    transformers checkpointing layer (a class-level ``gradient_checkpointing`` flag, as
    ``GradientCheckpointingLayer`` has) checkpoints its ``forward`` once
    ``gradient_checkpointing_enable()`` sets the flag. Code copied out of such a module into
    another module's graph runs without either.
    """
    if isinstance(module.__dict__.get("_modules", {}).get("_checkpoint_wrapped_module"),
                  torch.nn.Module):
        return "an activation-checkpoint wrapper"
    if any("gradient_checkpointing" in vars(klass) for klass in type(module).__mro__):
        return "a Hugging Face checkpointing layer"
    return None
