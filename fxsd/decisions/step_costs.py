"""A training step's FLOPs, counted on the gated model and charged to its gates (the counting
half of :mod:`fxsd.decisions.budget`, which turns these costs into savings and rates).

One run on fake tensors (:func:`fxsd.preserve.fake_weights`), every branch kept, each FLOP
charged to the innermost gate whose branch issued it — in the forward while the gate runs, in the
backward by the autograd nodes its branch created. Counted once per model
(:func:`record_step_costs`): at transform time for a ``target_saving``, else when first asked for
(:func:`defer_step_costs`, :func:`count_pending`). :func:`counting_run` is the one setting of
fxsd's FLOP counts (also :func:`fxsd.prune`'s forward costs).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxsd.errors import FxsdError, ModelRunError, Run
from fxsd.preserve import fake_weights, model_run, preserved
from fxsd.record import get_record
from fxsd.runtime.accessors import named_gates
from fxsd.runtime.gate import BranchGate

if TYPE_CHECKING:
    pass

__all__ = ["StepCosts", "measure_step_costs", "record_step_costs", "defer_step_costs",
           "count_pending", "PendingCosts", "counting_run"]


@dataclass(frozen=True)
class StepCosts:
    """FLOPs of one training step (forward + backward) on the example inputs.

    Attributes:
        total: the whole model's step.
        sites: each gate's own branch (by gate name), nested gates' branches not included.
        enclosing: for each gate, the gates whose branches hold it, nearest first.
    """

    total: int
    sites: dict[str, int]
    enclosing: dict[str, tuple[str, ...]]


class _Attribution:
    """Charges every FLOP the counter sees to the gate whose branch is running (``None``: the
    trunk): gates' hooks in the forward, autograd-node pre-hooks in the backward, each node the
    innermost gate's whose branch made it (an outer branch's nodes before a nested gate are the
    outer gate's, though its output reaches them only through the nested gate)."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.last = 0
        self.current: str | None = None
        self.flops: dict[str | None, int] = {}
        self.stack: list[tuple[str, set[Any]]] = []
        self.parent: dict[str, str | None] = {}
        self.owner: dict[Any, str] = {}  # autograd node -> gate whose branch created it

    def enclosing(self, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """For each gate, the gates whose branches hold it, nearest first."""
        found = {}
        for name in names:
            chain, up = [], self.parent.get(name)
            while up is not None:
                chain.append(up)
                up = self.parent.get(up)
            found[name] = tuple(chain)
        return found

    def switch(self, owner: str | None) -> None:
        now = self.counter.get_total_flops()
        self.flops[self.current] = self.flops.get(self.current, 0) + now - self.last
        self.last, self.current = now, owner

    def enter(self, name: str, args: tuple[Any, ...]) -> None:
        self.parent.setdefault(name, self.stack[-1][0] if self.stack else None)
        self.switch(name)
        self.stack.append((name, {t.grad_fn for t in _tensors(args)}))

    def leave(self, out: Any) -> None:
        name, inputs = self.stack.pop()
        todo, seen = [t.grad_fn for t in _tensors(out)], set()
        while todo:  # the autograd nodes made since enter(): stop at the gate's inputs
            fn = todo.pop()
            if fn is None or fn in inputs or fn in seen:
                continue
            seen.add(fn)
            owner = self.owner.setdefault(fn, name)
            # a nested gate's nodes stay its own, but the walk goes on through them: the nodes
            # of this branch before the nested gate feed the output only through it
            if owner == name or self._nested(owner, name):
                todo.extend(f for f, _ in fn.next_functions)
        self.switch(self.stack[-1][0] if self.stack else None)

    def _nested(self, inner: str, outer: str) -> bool:
        """Whether gate ``inner`` is inside ``outer``'s branch."""
        up = self.parent.get(inner)
        while up is not None:
            if up == outer:
                return True
            up = self.parent.get(up)
        return False

    def hook_backward(self, outputs: list[torch.Tensor]) -> None:
        seen: set[Any] = set()
        todo = [t.grad_fn for t in outputs]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            owner = self.owner.get(fn)
            fn.register_prehook(lambda grads, owner=owner: self.switch(owner))
            todo.extend(f for f, _ in fn.next_functions)


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def measure_step_costs(model: nn.Module, example_inputs: Sequence[Any] = (),
                       example_kwargs: Mapping[str, Any] | None = None, *,
                       real_run: bool = False) -> StepCosts:
    """Count one training step of the gated ``model`` on the examples, every branch kept.

    Runs on fake tensors (nothing is computed, nothing the model holds changes). A model that
    cannot run on fake tensors is run for real only with ``real_run`` (a ``target_saving`` needs
    the costs), its buffers, gradients and generators restored.

    Raises:
        ModelRunError: the model raised during the count (names the module; a BatchNorm in
            training on a batch of 1 is named as the cause).
        FxsdError: the model could not be counted on the examples otherwise (says why).
    """
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    try:
        return _count(model, args, kwargs, fake=True)
    except Exception as fake_error:  # noqa: BLE001 - data-dependent code: count a real run
        if not real_run:
            raise _counting_error(fake_error, "on fake tensors") from fake_error
        try:
            return _count(model, args, kwargs, fake=False)
        except Exception as exc:
            raise _counting_error(exc, f"on the example inputs (on fake tensors: "
                                       f"{type(fake_error).__name__}: {fake_error})") from exc


def _counting_error(exc: Exception, where: str) -> FxsdError:
    message = f"could not count the FLOPs of a training step {where}: {exc}"
    if isinstance(exc, ModelRunError):  # keep what the model raised in, for code to branch on
        return ModelRunError(message, exc.run, exc.module_path, exc.module_type)
    return FxsdError(f"could not count the FLOPs of a training step {where}: "
                     f"{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def counting_run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], fake: bool,
                 run: Run) -> Iterator[tuple[tuple[Any, ...], dict[str, Any], Any]]:
    """The one setting of fxsd's FLOP counts (a training step here, a forward for
    :func:`fxsd.prune`): ``model`` left as it was afterwards (:func:`~fxsd.preserve.preserved`),
    warnings silenced, with ``fake`` its parameters, buffers and the inputs swapped for fake
    tensors (:func:`~fxsd.preserve.fake_weights`: nothing is computed); yields the inputs to run
    and the ``FlopCounterMode``. The body sets the mode it counts in (train for a step)."""
    from torch.utils.flop_counter import FlopCounterMode

    with preserved(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = fake_weights(model, (args, kwargs), run=run, eval_mode=False) if fake \
            else _real_run(model, (args, kwargs), run)
        with inputs as (args, kwargs), FlopCounterMode(display=False) as counter:
            yield args, kwargs, counter


@contextlib.contextmanager
def _real_run(model: nn.Module, inputs: Any, run: Run) -> Iterator[Any]:
    """A counting run on the examples themselves (the model's own hooks silenced by
    :func:`~fxsd.preserve.preserved`, as in a fake run)."""
    with model_run(model, run):
        yield inputs


def _count(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
           fake: bool) -> StepCosts:
    gates = named_gates(model)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    try:
        with counting_run(model, args, kwargs, fake, Run.FLOP_COUNT) as (args, kwargs, counter):
            costs = _attributed_step(model, gates, counter, args, kwargs)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
    return costs


def _attributed_step(model: nn.Module, gates: dict[str, BranchGate], counter: Any,
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepCosts:
    """One forward and backward of ``model`` with every gate kept, FLOPs charged per gate."""
    seen = _Attribution(counter)
    handles = []
    for name, gate in gates.items():
        # keep every branch and draw nothing (at rate 1 a kept branch's scale would be 1/0);
        # preserved() puts each gate's mode, rate and draw back
        gate.mode, gate.drop_rate = "block", 0.0
        gate._draw_block = lambda: False
        handles.append(gate.register_forward_pre_hook(
            lambda m, a, name=name: seen.enter(name, a)))
        handles.append(gate.register_forward_hook(lambda m, a, out: seen.leave(out)))
    try:
        model.train()
        outputs = [t for t in _tensors(model(*args, **kwargs)) if t.requires_grad]
    finally:
        for h in handles:
            h.remove()
    seen.hook_backward(outputs)
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    seen.switch(None)
    return StepCosts(int(counter.get_total_flops()),
                     {name: int(seen.flops.get(name, 0)) for name in gates},
                     seen.enclosing(gates))


class PendingCosts:
    """What counting a gated model's step costs later takes, kept on its record
    (``FxsdRecord.pending_costs``) until something asks for them (:func:`count_pending`).

    A count runs on fake tensors, which read nothing of the examples but their shapes, strides,
    dtypes and devices: those are kept, not the tensors (a large example batch is not held
    alive by the model). A tensor that was on the model's device (in its dtype) follows the
    model's later ``.to()``. The model itself is held weakly; a copied or unpickled record
    counts on the model it is asked about, when that holds every gate.
    """

    def __init__(self, model: nn.Module, args: tuple[Any, ...],
                 kwargs: Mapping[str, Any] | None) -> None:
        flat, self.spec = tree_flatten((tuple(args), dict(kwargs or {})))
        self.device, self.dtype = _placement(model)
        self.leaves = [_ExampleSpec.of(x) if isinstance(x, torch.Tensor) else x for x in flat]
        self.gates = tuple(named_gates(model))
        self._model: weakref.ref[nn.Module] | None = weakref.ref(model)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def model_for(self, asked: nn.Module) -> nn.Module | None:
        """The model to count on when ``asked`` (the model or one of its parts) is asked about."""
        model = self._model() if self._model is not None else None
        if model is not None and any(m is asked for m in model.modules()):
            return model
        return asked if tuple(named_gates(asked)) == self.gates else None

    def inputs(self, model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Stand-ins for the examples (uninitialised: a fake run reads no value)."""
        device, dtype = _placement(model)

        def make(x: Any) -> Any:
            if not isinstance(x, _ExampleSpec):
                return x
            moved = x.device == self.device and device is not None
            cast = x.dtype == self.dtype and dtype is not None
            return torch.empty_strided(x.shape, x.stride, dtype=dtype if cast else x.dtype,
                                       device=device if moved else x.device,
                                       requires_grad=x.requires_grad)

        return tree_unflatten([make(x) for x in self.leaves], self.spec)


@dataclass(frozen=True)
class _ExampleSpec:
    """What a deferred count keeps of an example tensor. More than an abstract run's
    :class:`~fxsd.runtime.escape_path.TensorSpec` (shape, dtype, device): the count must run on
    what :func:`record_step_costs` would have run on, and an example that requires grad adds
    its gradient's FLOPs to the backward (its stride is kept with it, as the layout it came in)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    @classmethod
    def of(cls, x: torch.Tensor) -> _ExampleSpec:
        return cls(tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad)


def _placement(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and dtype of ``model``'s first floating-point parameter."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (None, None) if param is None else (param.device, param.dtype)


def defer_step_costs(model: nn.Module, example_inputs: Sequence[Any] = (),
                     example_kwargs: Mapping[str, Any] | None = None) -> None:
    """Leave ``model``'s step costs to be counted when first asked for (by :func:`fxsd.table`,
    :func:`expected_saving`, :func:`site_savings`): a count is one forward and backward on
    fake tensors, which a transform that needs no costs (no ``target_saving``) should not pay.
    The counts are those :func:`record_step_costs` would record now: FLOPs depend on shapes
    alone, not on weights or rates, and every gate is kept during a count."""
    get_record(model).pending_costs = PendingCosts(model, tuple(example_inputs), example_kwargs)


def count_pending(model: nn.Module) -> None:
    """Count the step costs :func:`defer_step_costs` left for later, if any, on the model
    ``model`` belongs to (:func:`record_step_costs`: a failure is kept on the record)."""
    record = get_record(model)
    pending = getattr(record, "pending_costs", None)  # a record pickled before it had one
    if pending is None or record.step_flops is not None:
        return
    whole = pending.model_for(model)
    if whole is None:  # a part of a copy: the whole model is not known
        return
    record.pending_costs = None
    args, kwargs = pending.inputs(whole)
    record_step_costs(whole, args, kwargs)


def record_step_costs(model: nn.Module, example_inputs: Sequence[Any] = (),
                      example_kwargs: Mapping[str, Any] | None = None, *,
                      real_run: bool = False) -> bool:
    """Count ``model``'s step costs (:func:`measure_step_costs`) and keep them on its gates'
    :class:`~fxsd.runtime.gate.GateInfo` (``step_flops``, ``enclosing``) and its
    :class:`~fxsd.record.FxsdRecord` (``step_flops``); where counting fails, the record keeps why
    (``step_flops_error``). Returns whether the costs were recorded. With ``real_run`` the
    costs are needed (a ``target_saving``): a failure raises, naming its cause."""
    record = get_record(model)
    try:
        costs = measure_step_costs(model, example_inputs, example_kwargs, real_run=real_run)
    except FxsdError as exc:
        if real_run:
            raise
        record.step_flops_error = str(exc)
        return False
    for name, gate in named_gates(model).items():
        gate.info = replace(gate.info, step_flops=costs.sites[name],
                            enclosing=costs.enclosing[name])
    record.step_flops, record.step_flops_error = costs.total, None
    return True
