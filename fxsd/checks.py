"""The promises :func:`fxsd.check` verifies, one at a time, and :func:`verify_transform`, the
cheap part :func:`fxsd.stochastic_depth` runs.

Each promise runs the plain and the gated model on the user's example inputs and compares what
it sees: eval outputs bit for bit, block by block (forward hooks on the modules that own gates,
:class:`PlainRun` the plain side); gate calls against their owners' calls, and each gate's depth
against the gates upstream of it on the autograd graph, in a training forward at rate 0; a
training step's gradients; a deep copy's and a saved and loaded model's eval output. Each gives a
:class:`CheckResult` of a :class:`CheckKind`; :class:`VerificationError` is what
:func:`verify_transform` raises.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxsd.errors import FxsdError, InvalidArgumentError, InvalidTypeError
from fxsd.preserve import preserved
from fxsd.runtime.accessors import named_gates
from fxsd.runtime.gate import BranchGate
from fxsd.tracing.calls import leaves
from fxsd.tracing.layer_drop import find_layer_drops, switch_off_layer_drops

__all__ = ["CheckKind", "CheckResult", "PlainRun", "VerificationError", "plain_run",
           "verify_transform"]


class VerificationError(FxsdError):
    """The transformed model breaks one of fxsd's promises on the example inputs.

    Attributes:
        kind: which promise (:class:`CheckKind`).
        module_path: the rewritten block or gate at fault (``""``: the root).
    """

    def __init__(self, message: str, kind: CheckKind, module_path: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.module_path = module_path


class CheckKind(str, enum.Enum):
    """The promises :func:`fxsd.check` verifies, in the order it runs them."""

    TRANSFORM = "transform"
    EVAL_OUTPUT = "eval output"
    GATES_REACHED = "gates reached"
    DEPTH_ORDER = "depth order"
    TRAINING_STEP = "training step"
    DEEPCOPY = "deepcopy"
    SAVE_LOAD = "save/load"
    ORIGINAL_UNTOUCHED = "original untouched"


@dataclass(frozen=True)
class CheckResult:
    """One promise's outcome: ``ok`` is ``None`` when it could not be checked (``detail`` says
    why); ``at`` names the block or gate at fault."""

    kind: CheckKind
    ok: bool | None
    detail: str = ""
    at: str = ""


def verify_transform(model: nn.Module | PlainRun, gated: nn.Module,
                     example_inputs: Sequence[Any] | None,
                     example_kwargs: dict[str, Any] | None) -> None:
    """The cheap part of :func:`fxsd.check`, run by :func:`fxsd.stochastic_depth`: one eval forward
    of each model; the gated model's output must be bit-identical and each gate called as
    often as the module that owns it. ``model`` is the plain model, or its :func:`plain_run`
    taken before the rewrite (a model gated in place).

    Raises:
        VerificationError: naming the first rewritten block whose output differs, or the first
            gate called less (or more) often than its join runs.
    """
    args, kwargs = _examples(example_inputs, example_kwargs)
    if isinstance(model, nn.Module):
        model = plain_run(model, _owner_paths(gated), args, kwargs)
    with preserved(gated):
        found = _eval_output(model, gated, args, kwargs, count_gates=True)
    if found.ok is False:
        raise VerificationError(
            f"fxsd's transform of {type(gated).__name__} is not the plain model: "
            f"{found.detail}. This is a bug in fxsd; please report it with the model. "
            "fxsd.check(model, example_inputs) shows every promise; verify=False skips this "
            "check.", found.kind, found.at)


# -- the promises ------------------------------------------------------------------------------

class _Failed(Exception):
    """A promise does not hold (internal: becomes a failed :class:`CheckResult`)."""

    def __init__(self, detail: str, at: str = "", kind: CheckKind | None = None) -> None:
        super().__init__(detail)
        self.detail, self.at, self.kind = detail, at, kind


def _result(kind: CheckKind, run: Any) -> CheckResult:
    try:
        detail = run()
    except _Failed as failed:
        return CheckResult(failed.kind or kind, False, failed.detail, failed.at)
    except Exception as exc:  # the model raised: the promise does not hold, and says why
        return CheckResult(kind, False, f"raised {type(exc).__name__}: {_one_line(exc)}")
    if isinstance(detail, CheckResult):
        return detail
    return CheckResult(kind, True, detail or "")


@dataclass
class PlainRun:
    """One eval forward of the plain model on the examples: its output, and the outputs and
    call counts of the modules at ``paths`` (the blocks a rewrite may own), in call order."""

    output: Any
    recorder: _Recorder


def plain_run(model: nn.Module, paths: Sequence[str], example_inputs: Sequence[Any] | None,
              example_kwargs: dict[str, Any] | None) -> PlainRun:
    """Run the plain ``model`` in eval once (under :func:`fxsd.preserve.preserved`), recording
    the modules at ``paths``: the reference :func:`verify_transform` compares with, taken
    before the rewrite when the model is gated in place."""
    args, kwargs = _examples(example_inputs, example_kwargs)
    recorder = _Recorder(model, paths)
    with preserved(model), recorder, torch.no_grad():
        output = _call(model.eval(), args, kwargs, "the plain model in eval")
    return PlainRun(output, recorder)


def _eval_output(plain: PlainRun | nn.Module, gated: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any], count_gates: bool = False) -> CheckResult:
    """Eval outputs compared, block by block; with ``count_gates``, gate calls too."""
    eval_scaled = [g for g in named_gates(gated).values() if g.scale == "eval"]
    owners = _owner_paths(gated)
    if isinstance(plain, nn.Module):
        plain = plain_run(plain, owners, args, kwargs)
    ours = _Recorder(gated, owners, count_gates=count_gates)
    with _rates_at_zero(eval_scaled), ours, torch.no_grad():
        got = _call(gated.eval(), args, kwargs, "the gated model in eval")
    if not _same(plain.output, got):
        block = _first_difference(plain.recorder, ours)
        where = (f"'{block or '<root>'}' is the first rewritten block whose output differs"
                 if block is not None else "every rewritten block's output agrees")
        return CheckResult(CheckKind.EVAL_OUTPUT, False,
                           f"the eval output differs from the plain model's; {where}",
                           block or "")
    if count_gates:
        wrong = _wrong_counts(gated, plain.recorder.calls, ours.gate_calls)
        if wrong:
            return CheckResult(CheckKind.GATES_REACHED, False, _count_message(wrong),
                               wrong[0][0])
    note = f" ({len(eval_scaled)} eval-scaled gates at rate 0)" if eval_scaled else ""
    return CheckResult(CheckKind.EVAL_OUTPUT, True, "bit-identical to the plain model" + note)


def _training_at_rate_zero(model: nn.Module, gated: nn.Module, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> list[CheckResult]:
    """One training forward of each model at rate 0 (the plain model's own layer drop off),
    the same RNG stream for both: gate calls against the owners' calls, and depth order."""
    owners = _owner_paths(gated)
    plain = _Recorder(model, owners)
    ours = _Recorder(gated, owners, count_gates=True, depth_order=True)
    seed = random.Random(0).randrange(2**31)
    try:
        switch_off_layer_drops(model, find_layer_drops(model))  # undone by preserved(model)
        with torch.random.fork_rng(devices=[]), plain:
            torch.manual_seed(seed)
            _call(model.train(), args, kwargs, "the plain model in training")
        with _rates_at_zero(list(named_gates(gated).values())), \
                torch.random.fork_rng(devices=[]), ours, torch.enable_grad():
            torch.manual_seed(seed)
            _call(gated.train(), args, kwargs, "the gated model in training at rate 0")
    except Exception as exc:
        failed = CheckResult(CheckKind.GATES_REACHED, False,
                             f"raised {type(exc).__name__}: {_one_line(exc)}")
        return [failed, CheckResult(CheckKind.DEPTH_ORDER, None, "not run")]
    wrong = _wrong_counts(gated, plain.calls, ours.gate_calls)
    reached = CheckResult(CheckKind.GATES_REACHED, not wrong,
                          _count_message(wrong) if wrong else
                          f"{len(ours.gate_calls)} gates, each as often as its join runs",
                          wrong[0][0] if wrong else "")
    return [reached, ours.depth_result()]


def _training_step(gated: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> str | CheckResult:
    params = [p for p in gated.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            out = _call(gated.train(), args, kwargs, "the gated model in training")
            loss = _loss(out)
            if loss is None:
                return CheckResult(CheckKind.TRAINING_STEP, None,
                                   "the output holds no floating tensor that needs a gradient")
            loss.backward()
        got = [p.grad for p in params if p.grad is not None]
        if not got:
            raise _Failed("no parameter got a gradient")
        bad = [g for g in got if not bool(torch.isfinite(g).all())]
        if bad:
            raise _Failed(f"{len(bad)} of {len(got)} gradients are not finite")
        return f"forward and backward ran; {len(got)} of {len(params)} parameters got gradients"
    finally:
        for p, g in zip(params, grads):
            p.grad = g


def _round_trip(kind: CheckKind, model: nn.Module, gated: nn.Module, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> str | CheckResult:
    try:
        other = _copied(kind, gated)
    except Exception as exc:
        try:  # torch cannot save some models at all (weight-norm parametrizations, local classes)
            _copied(kind, model)
        except Exception as plain:  # noqa: BLE001 - any failure: the plain model's own limit
            return CheckResult(kind, None, "not checked: the plain model cannot be copied "
                               f"either ({type(plain).__name__}: {_one_line(plain)[:120]})")
        raise exc
    # a rewritten root's class is made per model (a copy gets its own): compare by name
    if type(other).__qualname__ != type(gated).__qualname__:
        raise _Failed(f"the copy is a {type(other).__qualname__}, not a "
                      f"{type(gated).__qualname__}")
    if len(named_gates(other)) != len(named_gates(gated)):
        raise _Failed(f"the copy has {len(named_gates(other))} gates, the model "
                      f"{len(named_gates(gated))}")
    with torch.no_grad():
        want = _call(gated.eval(), args, kwargs, "the gated model in eval")
        with preserved(other):
            got = _call(other.eval(), args, kwargs, f"the model after {kind.value}")
    if not _same(want, got):
        raise _Failed("its eval output differs from the model's")
    return "same class, gates and eval output"


def _copied(kind: CheckKind, model: nn.Module) -> nn.Module:
    if kind is CheckKind.DEEPCOPY:
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -- recording calls ---------------------------------------------------------------------------

class _Recorder:
    """Forward hooks on the owners (outputs in call order, call counts) and, optionally, on the
    gates (call counts; with ``depth_order``, which gates each gate's inputs came from)."""

    def __init__(self, model: nn.Module, owners: Sequence[str], *, count_gates: bool = False,
                 depth_order: bool = False) -> None:
        self.model, self.owners = model, owners
        self.count_gates, self.depth_order = count_gates, depth_order
        self.outputs: list[tuple[str, Any]] = []
        self.calls: dict[str, int] = {}
        self.gate_calls: dict[str, int] = {}
        self.inversions: list[tuple[str, int, str, int]] = []
        self._ends: dict[Any, tuple[str, int]] = {}  # autograd node -> (gate, depth)
        self._handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for path in dict.fromkeys(self.owners):
            module = self.model.get_submodule(path) if path else self.model
            self._handles.append(module.register_forward_hook(self._owner_hook(path)))
        if self.count_gates:
            for path, gate in named_gates(self.model).items():
                self.gate_calls[path] = 0
                self._handles.append(gate.register_forward_hook(self._gate_hook(path)))
                if self.depth_order:
                    self._handles.append(gate.register_forward_pre_hook(self._depth_hook(
                        path, gate)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _owner_hook(self, path: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.calls[path] = self.calls.get(path, 0) + 1
            self.outputs.append((path, _detached(output)))
        return hook

    def _gate_hook(self, path: str) -> Any:
        def hook(gate: nn.Module, inputs: Any, output: Any) -> None:
            self.gate_calls[path] += 1
            if self.depth_order:
                first = next((t for t in leaves(output) if isinstance(t, torch.Tensor)), None)
                if first is not None and first.grad_fn is not None:
                    self._ends[first.grad_fn] = (path, gate.info.depth)
        return hook

    def _depth_hook(self, path: str, gate: BranchGate) -> Any:
        def hook(module: nn.Module, inputs: Any) -> None:
            for before, depth in _gates_upstream(inputs, self._ends):
                if depth >= gate.info.depth:
                    self.inversions.append((path, gate.info.depth, before, depth))
        return hook

    def depth_result(self) -> CheckResult:
        if not any(self.gate_calls.values()):
            return CheckResult(CheckKind.DEPTH_ORDER, None, "no gate ran")
        if not self._ends:
            return CheckResult(CheckKind.DEPTH_ORDER, None,
                               "the gates' outputs need no gradient: no data flow to follow")
        if not self.inversions:
            return CheckResult(CheckKind.DEPTH_ORDER, True,
                               "every gate is deeper than the gates its inputs come from")
        path, depth, before, before_depth = self.inversions[0]
        more = f" (and {len(self.inversions) - 1} more)" if len(self.inversions) > 1 else ""
        return CheckResult(CheckKind.DEPTH_ORDER, False,
                           f"'{path}' (depth {depth}) takes its input from '{before}' "
                           f"(depth {before_depth}){more}", path)


def _gates_upstream(inputs: Any, ends: dict[Any, tuple[str, int]],
                    limit: int = 20_000) -> list[tuple[str, int]]:
    """The gates nearest upstream of ``inputs`` on the autograd graph (the walk stops at a
    gate's output, so it covers only what was computed since the gates before)."""
    stack = [t.grad_fn for t in leaves(inputs)
             if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen: set[Any] = set()
    found: list[tuple[str, int]] = []
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in ends:
            found.append(ends[node])
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _owner_paths(gated: nn.Module) -> list[str]:
    """The module owning each gate (the gate's path less its own name), in gate order."""
    return [path.rpartition(".")[0] for path in named_gates(gated)]


def _wrong_counts(gated: nn.Module, owner_calls: dict[str, int],
                  gate_calls: dict[str, int]) -> list[tuple[str, int, int]]:
    return [(path, owner_calls.get(path.rpartition(".")[0], 0), calls)
            for path, calls in gate_calls.items()
            if calls != owner_calls.get(path.rpartition(".")[0], 0)]


def _count_message(wrong: list[tuple[str, int, int]]) -> str:
    path, want, got = wrong[0]
    owner = path.rpartition(".")[0] or "<root>"
    what = "is never called" if got == 0 else f"is called {got} times"
    more = f" (and {len(wrong) - 1} more gates)" if len(wrong) > 1 else ""
    return (f"gate '{path}' {what}, but '{owner}' runs its join {want} times in the plain "
            f"model{more}: the forward takes a path the rewrite did not reach")


def _first_difference(plain: _Recorder, ours: _Recorder) -> str | None:
    theirs = {}
    for path, out in ours.outputs:
        theirs.setdefault(path, []).append(out)
    seen: dict[str, int] = {}
    for path, out in plain.outputs:
        i = seen.get(path, 0)
        seen[path] = i + 1
        got = theirs.get(path, [])
        if i >= len(got) or not _same(out, got[i]):
            return path
    return None


@contextlib.contextmanager
def _rates_at_zero(gates: Sequence[BranchGate]) -> Iterator[None]:
    saved = [g.drop_rate for g in gates]
    try:
        for g in gates:
            g.drop_rate = 0.0
        yield
    finally:
        for g, rate in zip(gates, saved):
            g.drop_rate = rate


# -- values ------------------------------------------------------------------------------------

def _examples(example_inputs: Any, example_kwargs: Any) -> tuple[tuple[Any, ...],
                                                                 dict[str, Any]]:
    if example_inputs is None and example_kwargs is None:
        raise InvalidArgumentError(
            "fxsd.check runs the model: give example_inputs= (and/or example_kwargs=), one "
            "forward call's inputs (a batch of two or more where the model has BatchNorm)")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else \
        tuple(example_inputs or ())
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise InvalidTypeError(
            f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    return args, dict(example_kwargs or {})


def _call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> Any:
    clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
    args = torch.utils._pytree.tree_map(clone, args)
    kwargs = torch.utils._pytree.tree_map(clone, kwargs)
    return model(*args, **kwargs)


def _detached(value: Any) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _tensors(value)]


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in leaves(value) if isinstance(t, torch.Tensor)]


def _same(a: Any, b: Any) -> bool:
    """Bit-identical tensors (NaN equal to NaN at the same places), in the same structure."""
    xs, ys = _tensors(a), _tensors(b)
    if len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if torch.equal(x, y):
            continue
        if not (x.is_floating_point() or x.is_complex()):
            return False
        if not bool(((x == y) | (x.isnan() & y.isnan())).all()):
            return False
    return True


def _loss(out: Any) -> torch.Tensor | None:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    parts = [t.float().mean() for t in _tensors(out)
             if (t.is_floating_point() or t.is_complex()) and t.requires_grad]
    return sum(parts[1:], parts[0]) if parts else None


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
