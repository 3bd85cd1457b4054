"""``fxsd.check``: the transform verifies its promises on the user's own model.

fxsd's tests cover the families they know; a user brings models nobody here has tried. Whatever
fxsd did not foresee must then fail loudly, on that model, instead of training silently wrong.
:func:`check` transforms the model (or takes the result) and runs each promise on the user's own
example inputs:

* **eval output** — the gated model in eval is *bit-identical* to the plain model (gates with
  ``scale="eval"`` are compared at rate 0, where they too must be the plain model); where it is
  not, the first rewritten block whose output differs is named;
* **gates reached** — in a training forward with every rate at 0, each gate is called as many
  times as its join runs in the plain model (the calls of the module that owns it); a gate
  called less often stands on a path that forward does not take;
* **depth order** — each gate's depth is larger than the depth of every gate whose output its
  inputs were computed from (found on the autograd graph of that forward): the depth-indexed
  rates follow the data flow;
* **training step** — a training forward at the real rates and a backward run, and some
  parameter gets a finite gradient;
* **deepcopy**, **save/load** — ``copy.deepcopy`` and ``torch.save``/``torch.load`` give a model
  with the same eval output;
* **original untouched** — afterwards the original model's ``state_dict``, every module's
  attributes (and the contents of its dict attributes), flags, gradients and the global RNGs
  are what they were.

:func:`fxsd.stochastic_depth` runs the cheap part — eval bit-identical and every gate reached,
from one eval forward of each model — whenever it has example inputs (``verify=False`` turns it
off) and raises :class:`VerificationError` naming the first block or gate at fault.

Example:
    >>> import torch, torchvision, fxsd
    >>> report = fxsd.check(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),))
    >>> report.ok
    True
    >>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import enum
import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from fxsd.calls import leaves
from fxsd.errors import FxsdError, InvalidArgumentError, InvalidTypeError
from fxsd.gate import BranchGate
from fxsd.layer_drop import find_layer_drops, switch_off_layer_drops
from fxsd.preserve import generator_states, preserved
from fxsd.training import named_gates

__all__ = ["check", "CheckKind", "CheckResult", "CheckReport", "PlainRun", "VerificationError",
           "plain_run", "verify_transform"]


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
    """The promises :func:`check` verifies, in the order it runs them."""

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


@dataclass
class CheckReport:
    """What :func:`check` found; ``print(report)`` shows it as a table.

    Attributes:
        model: the model's class name.
        results: one :class:`CheckResult` per promise, in :class:`CheckKind` order.
        gated: the transformed model that was checked (``None`` when the transform failed).
    """

    model: str
    results: list[CheckResult] = field(default_factory=list)
    gated: nn.Module | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Every promise that could be checked holds (and the transform succeeded)."""
        return all(r.ok is not False for r in self.results) and self.gated is not None

    def result(self, kind: CheckKind) -> CheckResult | None:
        return next((r for r in self.results if r.kind is kind), None)

    def table(self, tablefmt: str = "simple", width: int | None = None) -> str:
        """The report as a table, one row per promise, and a verdict line. Long cells wrap to
        ``width`` columns (``None``: the terminal's, as :func:`fxsd.table`; ``0``: no limit)."""
        from fxsd.tables import fill, terminal_width

        limit = terminal_width() if width is None else width
        rows = [[r.kind.value, "ok" if r.ok else "-" if r.ok is None else "FAILED",
                 r.at or "-", r.detail] for r in self.results]
        widths = None
        if limit:  # the first two columns are short; the place and the detail wrap
            room = max(limit - 30, 32)
            widths = [None, None, room // 3, room - room // 3]
        text = tabulate(rows, headers=["check", "result", "at", "detail"], tablefmt=tablefmt,
                        maxcolwidths=widths)
        verdict = "every promise holds" if self.ok else "FAILED (the rows marked FAILED)"
        return text + "\n\n" + fill(f"{self.model}: {verdict}", limit)

    def __str__(self) -> str:
        return self.table()


def check(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None,
          example_kwargs: dict[str, Any] | None = None, *, gated: nn.Module | None = None,
          **options: Any) -> CheckReport:
    """Transform ``model`` and verify fxsd's promises on it (see the module docstring).

    Args:
        model: the plain model (it is not modified, and :func:`check` verifies that too).
        example_inputs, example_kwargs: one forward call's inputs; at least one is needed. Use
            a batch of two or more for models with BatchNorm (the training step).
        gated: check this result of ``fxsd.stochastic_depth(model, ...)`` instead of
            transforming ``model`` here.
        **options: :func:`fxsd.stochastic_depth`'s keyword arguments (``drop_rate=0.2``, ...).

    Returns:
        A :class:`CheckReport`: ``report.ok`` is whether every promise holds.
    """
    from fxsd.passes.stochastic_depth import stochastic_depth

    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"fxsd.check expects an nn.Module, got {type(model).__name__}")
    args, kwargs = _examples(example_inputs, example_kwargs)
    report = CheckReport(type(model).__name__)
    before = _Snapshot(model)
    if gated is None:
        try:
            gated = stochastic_depth(model, example_inputs=args, example_kwargs=kwargs,
                                     verify=False, **options)
        except FxsdError as exc:
            report.results.append(CheckResult(CheckKind.TRANSFORM, False, _one_line(exc)))
            report.results.append(before.compare(model))
            return report
    report.gated = gated
    report.results.append(CheckResult(CheckKind.TRANSFORM, True,
                                      f"{len(named_gates(gated))} gates"))
    with preserved(model), preserved(gated):
        report.results.append(_result(CheckKind.EVAL_OUTPUT,
                                      lambda: _eval_output(model, gated, args, kwargs)))
        report.results += _training_at_rate_zero(model, gated, args, kwargs)
        report.results.append(_result(CheckKind.TRAINING_STEP,
                                      lambda: _training_step(gated, args, kwargs)))
        for kind in (CheckKind.DEEPCOPY, CheckKind.SAVE_LOAD):
            report.results.append(_result(
                kind, lambda k=kind: _round_trip(k, model, gated, args, kwargs)))
    report.results.append(before.compare(model))
    return report


def verify_transform(model: nn.Module | PlainRun, gated: nn.Module,
                     example_inputs: Sequence[Any] | None,
                     example_kwargs: dict[str, Any] | None) -> None:
    """The cheap part of :func:`check`, run by :func:`fxsd.stochastic_depth`: one eval forward
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


# -- the original, before and after ------------------------------------------------------------

class _Snapshot:
    """What "the original model is untouched" compares: its state_dict values, every module's
    attributes (identity, and the contents of dict and set attributes), gradients, global RNGs."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.modules = [(path, m, _attribute_view(m))
                        for path, m in model.named_modules(remove_duplicate=False)]
        self.grads = [(name, p.grad) for name, p in model.named_parameters()]
        self.rng = generator_states()

    def compare(self, model: nn.Module) -> CheckResult:
        kind = CheckKind.ORIGINAL_UNTOUCHED
        now = model.state_dict(keep_vars=True)
        if now.keys() != self.state.keys():
            return CheckResult(kind, False, "its state_dict keys changed")
        for key, value in self.state.items():
            if not _same(value, now[key].detach()):
                return CheckResult(kind, False, f"state_dict[{key!r}] changed", key)
        paths = [(path, m) for path, m in model.named_modules(remove_duplicate=False)]
        if [p for p, _ in paths] != [p for p, _, _ in self.modules]:
            return CheckResult(kind, False, "its module tree changed")
        for (path, module, view), (_, now_module) in zip(self.modules, paths):
            if now_module is not module:
                return CheckResult(kind, False, "another module object is at this path",
                                   path or "<root>")
            changed = _changed_attribute(view, _attribute_view(module))
            if changed:
                return CheckResult(kind, False, f"attribute {changed!r} changed",
                                   path or "<root>")
        for name, grad in self.grads:
            if model.get_parameter(name).grad is not grad:
                return CheckResult(kind, False, f"the gradient of {name!r} changed", name)
        if not _same_rng(self.rng, generator_states()):
            return CheckResult(kind, False, "a global random generator's state changed")
        return CheckResult(kind, True, "state_dict, attributes, flags, gradients and RNGs "
                                       "as they were")


def _attribute_view(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    return {name: (value, dict(value) if isinstance(value, dict) else
                   frozenset(value) if isinstance(value, set) else None)
            for name, value in module.__dict__.items()}


def _changed_attribute(before: dict[str, tuple[Any, Any]],
                       after: dict[str, tuple[Any, Any]]) -> str | None:
    if before.keys() != after.keys():
        return next(iter(before.keys() ^ after.keys()))
    for name, (value, contents) in before.items():
        now, now_contents = after[name]
        if now is not value:
            return name
        if isinstance(contents, dict):
            if contents.keys() != now_contents.keys() or any(
                    contents[k] is not now_contents[k] for k in contents):
                return name
        elif contents != now_contents:
            return name
    return None


def _same_rng(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`fxsd.preserve.generator_states` are the same states."""
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if name == "numpy":  # ("MT19937", keys, position, has_gauss, cached_gaussian)
            same = x[0] == y[0] and bool((x[1] == y[1]).all()) and tuple(x[2:]) == tuple(y[2:])
        elif name == "cuda":
            same = all(torch.equal(s, t) for s, t in zip(x, y))
        else:
            same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            return False
    return True
