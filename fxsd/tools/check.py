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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from fxsd.checks import (
    CheckKind,
    CheckResult,
    VerificationError,
    _eval_output,
    _examples,
    _one_line,
    _result,
    _round_trip,
    _same,
    _training_at_rate_zero,
    _training_step,
    verify_transform,
)
from fxsd.errors import FxsdError, InvalidTypeError
from fxsd.preserve import generator_states, preserved
from fxsd.runtime.accessors import named_gates

__all__ = ["check", "CheckKind", "CheckReport", "VerificationError", "verify_transform"]


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
        from fxsd.tools.tables import fill, terminal_width

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
    from fxsd.transform import stochastic_depth

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
