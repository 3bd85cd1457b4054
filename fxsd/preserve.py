"""``preserved(model)``: whatever fxsd runs on a model, the model and the process come back as they
were.

Some analyses have to *run* the model: tracing by example records each module's call in one
forward (in the model's own mode, so a training-mode forward updates BatchNorm statistics and
draws dropout masks), timm's not-traceable units run on a random input, the tracer evaluates ops
on example values. None of that may leave a trace. On exit, :func:`preserved` puts back

* every buffer's values (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``),
  in place, so a tensor the user holds still is the model's buffer;
* every module's attributes — its ``training`` flag, its hook registries, its child, parameter
  and buffer registries, any plain attribute a forward set or removed — *by putting back* the
  objects they were. A container is never mutated unless its contents changed: a config that
  refuses ``update`` (diffusers' ``FrozenDict``), a ``MappingProxyType`` or a custom container
  comes back as the very object it was, untouched. Only a plain ``dict``/``OrderedDict``/``set``
  whose contents a run changed (a hook registry, whose handles the user holds, must keep its
  identity) is mended in place, entry by entry;
* the global random number generators: torch's CPU generator and every initialised CUDA
  device's, Python's ``random`` and, when it is imported, NumPy's legacy global generator.

While the body runs, the modules' forward and backward hooks are not called
(:func:`hooks_silenced`): they are the user's, for the user's own calls — a hook that logs
activations must not log fxsd's runs, nor see the fake tensors of its abstract ones.

:func:`guarded` is what the public entry points run under: a failure anywhere inside puts
the model's attributes and the generators back and surfaces as an :class:`~fxsd.FxsdError` (the
original exception chained). :func:`model_run` wraps what the model itself raises during one of
fxsd's runs of it in a :class:`~fxsd.errors.ModelRunError` naming the run and the module,
:func:`fake_tensors` is the one fake-tensor mode every abstract run uses, with torch's loggers
quiet (a failed fake kernel that fxsd handles is not a crash to print), and :func:`fake_weights`
the one setting of a run on fake tensors: the module's weights swapped for fakes, its hooks
silent, and everything put back.

Parameters are not copied (a forward without an optimizer does not write them, and copying a
large model's weights would double its memory).

Example:
    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18().train()
    >>> before = {k: v.clone() for k, v in model.state_dict().items()}
    >>> with preserved(model):
    ...     _ = model(torch.randn(2, 3, 32, 32))  # updates BatchNorm statistics, for now
    >>> all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    True
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import random
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fxsd.errors import (
    FxsdError,
    InvalidArgumentError,
    InvalidTypeError,
    ModelRunError,
    Run,
    TransformError,
)

__all__ = ["hooks_silenced", "preserved", "restored_on_failure", "guarded", "model_run",
           "run_error", "fake_tensors", "fake_weights", "generator_states"]

#: The registries of the hooks a module call runs (each a dict, swapped for an empty one while
#: fxsd runs it).
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")

#: The container types mended in place when a run changed their contents. Exact types only: a
#: subclass may refuse mutation (diffusers' ``FrozenDict``), so it is put back, never mended.
_MENDED = (dict, OrderedDict, set)

#: torch's loggers that report at ERROR level a kernel that failed on fake tensors, although the
#: exception reaches fxsd, which handles it (a real run, or a reason in the analysis).
_FAKE_RUN_LOGGERS = ("torch._subclasses.fake_tensor", "torch._subclasses.meta_utils",
                     "torch.fx.experimental.symbolic_shapes")

_MISSING = object()

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body, then restore ``model``'s buffers and module attributes and the process's
    global random generators to what they were on entry (also when the body raises)."""
    modules = _modules(model)
    attributes = [(m, _attributes(m)) for m in modules]
    buffers = [(m, name, b, b.detach().clone()) for m in modules
               for name, b in m._buffers.items() if b is not None]
    generators = generator_states()
    try:
        with hooks_silenced(model):
            yield
    finally:
        for module, saved in attributes:
            _restore_attributes(module, saved)
        _restore_buffers(buffers)
        _restore_generators(generators)


@contextlib.contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """Run the body; if it raises, put ``model``'s module attributes (flags, registries, child
    modules, anything set or removed) and the global generators back as they were, and re-raise.
    A body that succeeds keeps its changes (``inplace=True``)."""
    attributes = [(m, _attributes(m)) for m in _modules(model)]
    generators = generator_states()
    try:
        yield
    except BaseException:
        for module, saved in attributes:
            _restore_attributes(module, saved)
        _restore_generators(generators)
        raise


@contextlib.contextmanager
def hooks_silenced(model: nn.Module) -> Iterator[None]:
    """Run the body without calling the forward and backward hooks of ``model``'s modules.

    Each module's registries are swapped for empty ones while the body runs and put back on
    exit: the user's registries are never mutated, so the handles the user holds stay valid,
    and hooks registered in the body (fxsd's own) are gone on exit.

    Example:
        >>> from torch import nn
        >>> import torch
        >>> layer, seen = nn.Linear(2, 2), []
        >>> handle = layer.register_forward_hook(lambda m, args, out: seen.append(out))
        >>> with hooks_silenced(layer):
        ...     _ = layer(torch.ones(1, 2))
        >>> _ = layer(torch.ones(1, 2))
        >>> len(seen)
        1
    """
    saved = [(m, name, registry) for m in _modules(model) for name in _CALL_HOOKS
             if (registry := m.__dict__.get(name))]
    for module, name, _ in saved:
        module.__dict__[name] = OrderedDict()
    try:
        yield
    finally:
        for module, name, registry in saved:
            module.__dict__[name] = registry


def guarded(what: str) -> Callable[[F], F]:
    """Decorate a public entry point whose first argument is the model (``what`` names it in
    messages): a model fxsd cannot work on is refused before any work, and a failure anywhere
    inside leaves the model as it was (:func:`restored_on_failure`) and surfaces as an
    :class:`~fxsd.FxsdError` — an exception fxsd did not foresee as a
    :class:`~fxsd.errors.TransformError` with the original chained. FxsdErrors pass unchanged."""
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def entry(model: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(model, nn.Module):
                return fn(model, *args, **kwargs)  # the entry point's own type error
            _check_model(model, what, _gives_examples(signature, model, args, kwargs))
            try:
                with restored_on_failure(model):
                    return fn(model, *args, **kwargs)
            except FxsdError:
                raise
            except Exception as exc:
                raise TransformError(
                    f"{what} failed on {type(model).__name__} with an error fxsd did not "
                    f"foresee: {type(exc).__name__}: {exc}. The model is as it was; please "
                    "report this with the model's code.") from exc
        return entry  # type: ignore[return-value]
    return decorate


def _gives_examples(signature: inspect.Signature, model: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> bool:
    try:
        bound = signature.bind_partial(model, *args, **kwargs).arguments
    except TypeError:
        return False
    return any(bound.get(name) is not None
               for name in ("example_inputs", "example_kwargs", "target_saving"))


def _check_model(model: nn.Module, what: str, examples: bool) -> None:
    """Refuse, before any work, a model fxsd can neither trace nor run."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidTypeError(
            f"{what} got a TorchScript module ({type(model).__name__}): torch.fx cannot trace "
            "compiled TorchScript. Pass the nn.Module itself (before torch.jit.script or "
            "torch.jit.trace); script the transformed model afterwards if you need to.")
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers())
                 if t.is_meta), None)
    if meta is not None and examples:
        raise InvalidArgumentError(
            f"{what}: {type(model).__name__} has tensors on the meta device (first: '{meta}'), "
            "which hold no values, so fxsd cannot run it on example inputs. Materialize it first "
            "(model.to_empty(device=...) and load its weights), or transform it without "
            "example_inputs/example_kwargs/target_saving.")


@contextlib.contextmanager
def model_run(model: nn.Module, run: Run) -> Iterator[None]:
    """Run the body — one of fxsd's own runs of ``model`` — turning what the model raises into
    a :class:`~fxsd.errors.ModelRunError` that names ``run`` and the module (:func:`run_error`).
    FxsdErrors pass unchanged."""
    try:
        yield
    except FxsdError:
        raise
    except Exception as exc:
        raise run_error(model, run, exc) from exc


def run_error(model: nn.Module, run: Run, exc: BaseException, detail: str = ""
              ) -> ModelRunError:
    """The :class:`~fxsd.errors.ModelRunError` for ``exc``, raised by ``model`` during ``run``:
    it names the innermost module of ``model`` whose ``forward`` was running when it was raised
    (the root when none was), and how to fix the commonest cause. ``detail`` adds where else."""
    module, path = _raising_module(model, exc)
    where = f"'{path}' ({type(module).__name__})" if path else f"its root ({type(model).__name__})"
    hint = ""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        hint = (f" '{path or '<root>'}' is a BatchNorm in training mode, which needs more than "
                "one value per channel: give example inputs with a batch of at least 2 (or a "
                "larger input, so the feature map there is larger than 1x1).")
    text = str(exc).rstrip()
    end = "" if text.endswith(".") else "."
    return ModelRunError(
        f"{type(model).__name__} raised in {where} during fxsd's {run.value}{detail}: "
        f"{type(exc).__name__}: {text}{end}{hint}", run, path, type(module).__name__)


def _raising_module(model: nn.Module, exc: BaseException) -> tuple[nn.Module, str]:
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    found: tuple[nn.Module, str] = (model, "")
    tb = exc.__traceback__
    while tb is not None:  # outermost to innermost frame: the last module frame wins
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            found = (owner, paths[id(owner)])
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def fake_tensors() -> Iterator[Any]:
    """Enter a ``FakeTensorMode`` (real tensors allowed as inputs) and yield it: the one mode
    every abstract run of fxsd uses. torch's fake-tensor loggers are quiet meanwhile: a kernel
    that fails on fake tensors logs a traceback at ERROR level before its exception reaches
    fxsd, which handles it, so a successful transform would print a crash log."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    loggers = [logging.getLogger(name) for name in _FAKE_RUN_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def fake_weights(module: nn.Module, inputs: Any, *, run: Run, eval_mode: bool) -> Iterator[Any]:
    """Run the body on fake tensors (:func:`fake_tensors`): ``module``'s parameters and buffers
    swapped for fake copies (tied weights stay tied), and ``inputs`` (any nesting of tuples,
    lists and dicts) yielded with each tensor in it a fake one. Nothing is computed, and the
    module comes back as it was: its own tensors (a BatchNorm update in the body lands on the
    copy), its ``training`` flags, its hook registries. What the module raises arrives as a
    :class:`~fxsd.errors.ModelRunError` naming ``run`` (:func:`model_run`).

    The user's forward and backward hooks are not called (:func:`hooks_silenced`), in every fake
    run: they are the user's, for the user's calls, and would see fake tensors; none of fxsd's
    fake runs needs them (a symbolic trace does not call them either). Hooks the body registers
    (a FLOP count's own) are gone on exit.

    Args:
        module: whose state is faked; the body may run it or a part reading its state (a gated
            block's branch, hosted by the block).
        inputs: the example inputs, faked for the body.
        run: the run a failure names (``Run.ABSTRACT``, ``Run.FLOP_COUNT``).
        eval_mode: every module in eval mode for the body. A run that must draw and update
            nothing and give the shapes of an eval-mode call (the zeros and escaping values of
            a skipped branch, :func:`fxsd.runtime.escape_path.abstract_run`) asks for it; a run
            in the model's own mode (each node's shapes and FLOPs in the mode the graph was
            traced in, :func:`fxsd.analysis.node_costs.profile_nodes`) or in a mode it sets
            itself (a FLOP count: train for a training step, eval for :func:`fxsd.prune`'s
            forward) does not.

    Example:
        >>> layer = nn.Linear(2, 3)
        >>> with fake_weights(layer, (torch.ones(4, 2),), run=Run.ABSTRACT,
        ...                   eval_mode=True) as (x,):
        ...     print(tuple(layer(x).shape), type(layer.weight).__name__)
        (4, 3) FakeTensor
        >>> type(layer.weight).__name__
        'Parameter'
    """
    from torch.nn.utils.stateless import _reparametrize_module

    flags = [(m, m.training) for m in _modules(module)]
    with fake_tensors() as mode, model_run(module, run), hooks_silenced(module):
        state = {**dict(module.named_parameters(remove_duplicate=False)),
                 **dict(module.named_buffers(remove_duplicate=False))}
        fake = {name: mode.from_tensor(t) for name, t in state.items()}
        faked = tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x,
                         inputs)
        try:
            if eval_mode:
                for m, _ in flags:
                    m.training = False
            with _reparametrize_module(module, fake, tie_weights=True):
                yield faked
        finally:
            for m, training in flags:
                m.training = training


def _modules(model: nn.Module) -> list[nn.Module]:
    return list({id(m): m for m in model.modules()}.values())


def _contents(value: Any) -> Any:
    """A copy of a mended container's contents (``None`` for every other object)."""
    if type(value) is set:
        return set(value)
    if type(value) in _MENDED:
        return list(value.items())
    return None


def _attributes(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """Each attribute's object and, for a plain dict or set (registries), its contents."""
    return {name: (value, _contents(value)) for name, value in module.__dict__.items()}


def _restore_attributes(module: nn.Module, saved: dict[str, tuple[Any, Any]]) -> None:
    """Put each attribute back as the object it was; mend a registry only if it changed."""
    state = module.__dict__
    for name in [n for n in state if n not in saved]:
        del state[name]
    for name, (value, contents) in saved.items():
        if state.get(name, _MISSING) is not value:
            state[name] = value
        if contents is not None:
            _mend(value, contents)


def _mend(container: Any, contents: Any) -> None:
    """Give a plain dict, OrderedDict or set ``contents`` again, in place (its identity is what
    a hook handle holds), touching only the entries that changed; unchanged, it is not touched.
    Dict values are compared by identity: an equal but other object is put back too."""
    if isinstance(container, set):
        if container != contents:
            container.difference_update(container - contents)
            container.update(contents - container)
        return
    keys = [k for k, _ in contents]
    if list(container) == keys and all(container[k] is v for k, v in contents):
        return
    wanted = dict(contents)
    for key in [k for k in container if k not in wanted]:
        del container[key]
    for key, value in contents:
        if container.get(key, _MISSING) is not value:
            container[key] = value
    if list(container) != keys:  # an entry removed and added again: its place, too
        for key, value in contents:
            del container[key]
            container[key] = value


def _restore_buffers(buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]) -> None:
    """Each buffer's values, in place (a tensor the user holds still is the model's buffer)."""
    with torch.no_grad():
        for module, name, buffer, value in buffers:
            if module._buffers.get(name) is not buffer:
                module._buffers[name] = buffer
            if buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer.data = value
            elif not buffer.is_meta and not torch.equal(buffer, value):
                buffer.copy_(value)


def generator_states() -> dict[str, Any]:
    """The states of the process's global random generators: torch's CPU generator and every
    initialised CUDA device's, Python's ``random`` and, when imported, NumPy's legacy one."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    return states


def _restore_generators(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        sys.modules["numpy"].random.set_state(states["numpy"])
