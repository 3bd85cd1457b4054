"""Random draws on the host while tracing: the model's own code deciding by a random number.

A trace runs a model's Python once, so ``if torch.rand(1).item() < p: skip`` would be decided
there and its outcome fixed into the graph. While :class:`~fxsd.tracing.tracer.FxsdTracer` traces,
:func:`watching_draws` reports each draw the model's code makes on concrete values (random torch
ops, Python's and NumPy's global generators) to :meth:`~fxsd.tracing.tracer.FxsdTracer.drew`, which
names the module that drew; :func:`_trace_keeping_draws` then traces again with that module
kept whole, a leaf whose code keeps drawing at run time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fxsd.errors import RandomDrawError
from fxsd.tracing.calls import ModuleCall

if TYPE_CHECKING:
    from fxsd.arguments import LeafSpec
    from fxsd.tracing.tracer import FxsdTracer, Modes

__all__ = ["HostStates", "watching_draws", "draws_unwatched"]

# Each module whose code draws random numbers costs one more trace; a bound as for the modes.
MAX_KEPT_DRAWS = 64


# -- random draws on the host while tracing -------------------------------------------------
#
# A trace runs the model's Python once: ``if torch.rand(1).item() < p: skip`` is decided there
# and the graph keeps that one outcome. Ops on proxies (dropout on a traced tensor,
# ``torch.rand_like(x)``) are recorded, never run; any draw that does run while tracing is the
# model's code on concrete values. Three sources are watched: every torch op the dispatcher
# tags ``nondeterministic_seeded`` (rand, randn, randint, bernoulli, multinomial, normal,
# uniform_, dropout, ... on any generator and device), seen by a dispatch mode; the functions
# of Python's ``random`` and NumPy's ``numpy.random`` modules, patched while tracing; and, for
# draws spelt otherwise (``from random import random``), the state of those two global
# generators, compared before and after the trace.


class _DrawWatch(TorchDispatchMode):
    """Reports each random op on real tensors to the tracer (ops on proxies never get here)."""

    def __init__(self, tracer: FxsdTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.tracer.drew(f"torch.{func.overloadpacket.__name__}", _model_frame())
        return func(*args, **(kwargs or {}))


def _host_generators() -> list[tuple[str, Any, list[str]]]:
    """(name, module, drawing functions) of the global host generators: Python's ``random``
    and, when imported, NumPy's legacy ``numpy.random`` (its functions are bound methods of
    one hidden generator in both)."""
    found = [("random", random, random._inst)]  # type: ignore[attr-defined]
    numpy = sys.modules.get("numpy")
    rand = getattr(getattr(getattr(numpy, "random", None), "mtrand", None), "_rand", None)
    if rand is not None:
        found.append(("numpy.random", numpy.random, rand))  # type: ignore[union-attr]
    not_draws = {"seed", "getstate", "setstate", "get_state", "set_state"}
    return [(name, module, [f for f in dir(module) if not f.startswith("_")
                            and f not in not_draws
                            and getattr(getattr(module, f), "__self__", None) is inst])
            for name, module, inst in found]


class HostStates:
    """The states of the global host generators that no patch can watch, to compare."""

    def __init__(self) -> None:
        self.states = self._now()

    @staticmethod
    def _now() -> tuple[Any, ...]:
        numpy = sys.modules.get("numpy")
        return (random.getstate(),
                numpy.random.get_state(legacy=False) if numpy is not None else None)

    def moved(self) -> str | None:
        """The generator whose state moved since the last :meth:`sync`, if any."""
        now = self._now()
        if now[0] != self.states[0]:
            return "Python's global random"
        a, b = now[1], self.states[1]
        if a is not None and ((a["state"]["pos"], a["has_gauss"], a["gauss"])
                              != (b["state"]["pos"], b["has_gauss"], b["gauss"])
                              or (a["state"]["key"] != b["state"]["key"]).any()):
            return "NumPy's global numpy.random"
        return None

    def sync(self) -> None:
        self.states = self._now()

    def check(self, tracer: FxsdTracer) -> None:
        """Report a draw to ``tracer`` if a generator's state moved since the last sync."""
        moved = self.moved()
        if moved is not None:
            tracer.drew(f"{moved} generator (its state moved)", "")


@contextlib.contextmanager
def watching_draws(tracer: FxsdTracer) -> Iterator[None]:
    """Report the model's random draws to ``tracer`` (:meth:`FxsdTracer.drew`) while tracing."""
    patched: list[tuple[Any, str, Any]] = []

    def watched(source: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def draw(*args: Any, **kwargs: Any) -> Any:
            tracer.drew(source, _model_frame())
            return fn(*args, **kwargs)
        return draw

    for name, module, functions in _host_generators():
        for f in functions:
            original = getattr(module, f)
            patched.append((module, f, original))
            setattr(module, f, watched(f"{name}.{f}", original))
    tracer.host_states = HostStates()
    tracer.draw_watch = _DrawWatch(tracer)
    try:
        with tracer.draw_watch:
            yield
        if tracer.draw is None:
            tracer.host_states.check(tracer)
    finally:
        for module, f, original in reversed(patched):
            setattr(module, f, original)


@contextlib.contextmanager
def draws_unwatched(tracer: FxsdTracer) -> Iterator[None]:
    """Run real ops without the tracer's dispatch mode (the tracer by example evaluating
    recorded ops on example values: its draws are not the model's, and the mode costs time)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

    if tracer.draw_watch is not None and _get_current_dispatch_mode() is tracer.draw_watch:
        with _pop_mode_temporarily():
            yield
    else:
        yield


def _fxsd_dirs() -> tuple[str, ...]:
    """Where the code that is not the model's lives: torch, fxsd, and the generators' (with the
    separator: torchaudio's or torchvision's code is a model's)."""
    package = os.path.dirname(os.path.dirname(__file__))  # fxsd/, above this step's folder
    dirs = [os.path.dirname(torch.__file__) + os.sep, package + os.sep, random.__file__]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        dirs.append(os.path.dirname(numpy.__file__) + os.sep)
    return tuple(dirs)


def _model_frame() -> str:
    """``file:line`` of the innermost frame of the model's own code on the stack."""
    skipped = _fxsd_dirs()
    frame = sys._getframe(1)
    while frame is not None:
        file = frame.f_code.co_filename
        if not file.startswith(skipped):
            return f"{file}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


def _draw_error(path: str, kind: str, source: str, location: str) -> RandomDrawError:
    at = f" at {location}" if location else ""
    if path:
        message = (
            f"module '{path}' ({kind}) draws a random number on the host ({source}{at}): not "
            "traced, so that the draw keeps deciding at run time (a trace would fix its "
            "outcome); joins in its own code are not gated\n"
            "fxsd gates the joins inside its children instead. To choose yourself which "
            f"modules stay whole, pass leaf_modules=['{path}', ...].")
    else:
        message = (
            f"the root module ({kind}) draws a random number on the host ({source}{at}) in its "
            "own forward: a trace would fix that draw's outcome into the graph (a layer skipped "
            "at random would then always run, or never), and the root cannot be kept whole\n"
            "Move the random code into a submodule (fxsd keeps a module that draws whole and "
            "gates inside its children), or give example_inputs= / example_kwargs= (fxsd then "
            "leaves the root's own code as written and gates inside its children), or pass "
            "leaf_modules=[...] for the submodules you want left as they are.")
    return RandomDrawError(message, module_path=path, module_type=kind, location=location,
                           source=source)


def _trace_keeping_draws(
    model: nn.Module, path: str, leaves: Sequence[LeafSpec], concrete_args: dict[str, Any] | None,
    make_tracer: Callable[[Sequence[LeafSpec]], FxsdTracer], modes: Modes,
) -> tuple[fx.Graph, dict[str, Any], list[str], list[ModuleCall], bool | None,
           list[RandomDrawError]]:
    """:func:`_trace_training_aware` of the module at ``path``, keeping whole (a leaf) each
    module inside it whose own code draws a random number while traced: as a leaf, its code runs
    as written on every call, where a trace would fix the draw's outcome. Also returns those
    draws (:class:`~fxsd.errors.RandomDrawError`\\ s naming the modules). A draw in the traced
    module's own code raises."""
    # fxsd.tracing._train_eval traces with fxsd.tracing.tracer's tracer, and fxsd.tracing.tracer
    # imports this module
    from fxsd.tracing._train_eval import _trace_training_aware

    module = model.get_submodule(path) if path else model
    drawn: list[RandomDrawError] = []
    locate = False

    def tracer(leaves: Sequence[LeafSpec]) -> FxsdTracer:
        made = make_tracer(leaves)
        made.locate_host_draws = locate
        return made

    while True:
        kept = [model.get_submodule(e.module_path) for e in drawn]
        try:
            return (*_trace_training_aware(module, [*leaves, *kept], concrete_args, tracer,
                                           path, modes), drawn)
        except RandomDrawError as exc:
            if not exc.location and not locate:  # a global state moved: find the module
                locate = True
                continue
            inside = exc.module_path.startswith(path + ".") if path else bool(exc.module_path)
            if not inside or len(drawn) >= MAX_KEPT_DRAWS:
                raise
            drawn.append(exc)
