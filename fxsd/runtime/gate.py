"""The gate runtime: :class:`BranchGate` runs or skips one residual branch.

A gated graph calls the gate where the add used to be: ``self.<name>_gate(x, *side_inputs)`` for
an identity skip (the fork *is* the skip), ``self.<name>_gate(skip, fork, *side_inputs)`` for a
projection skip (``self.residual_gate(downsample, x)`` in a ResNet ``Bottleneck``).

* **block** mode draws one host-side number per training forward: a dropped branch returns the
  skip and its nodes never run, so neither their forward nor their backward costs anything.
* **sample** mode decides per example (row). Its ``subset`` implementation runs the branch on the
  kept rows only and adds the result back into the skip at those rows (``index_add``), so dropped
  rows cost nothing; its ``mask`` implementation runs the branch on the whole batch and multiplies
  it by the row mask, exactly like timm's ``DropPath`` and torchvision's ``StochasticDepth``.

Scaling follows ``scale``: ``"eval"`` (the paper, Composer) multiplies the branch by its keep
probability at inference; ``"train"`` (timm, torchvision) divides kept branches by it in training
and leaves inference alone; ``"none"`` never scales (:func:`fxsd.runtime.join.branch_scale`).

The add is the one the source wrote (:class:`fxsd.runtime.join.Join`, kept in
:attr:`GateInfo.join`): the same function, operand order, ``alpha`` and in-place spelling, so that a
gated model in eval computes the plain model's outputs bit for bit, layout of the sum included.
Scaling happens inside the add (``torch.add(..., alpha=)``, ``index_add(..., alpha=)``), not as an
extra kernel, wherever the operand order allows it (:meth:`fxsd.runtime.join.Join.__call__` says
where it does not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxsd.arguments import check_rate
from fxsd.graph_module import HostedGraphModule
from fxsd.runtime.escape_path import EscapePath, TensorSpec, abstract_run
from fxsd.runtime.gate_info import DropPathAction, GateInfo, SharedUse, ShareKind
from fxsd.runtime.join import Join, branch_scale, row_factor
from fxsd.runtime.recompute import decide
from fxsd.runtime.sampler import DropSampler

if TYPE_CHECKING:
    from fxsd.record import FxsdRecord

# DropSampler (fxsd.runtime.sampler), GateInfo and DropPathAction (fxsd.runtime.gate_info) are
# re-exported: docs/api.md documents them under this module's path. SharedUse too: models pickled
# before the split name fxsd.runtime.gate.SharedUse (as they name the other three here).
__all__ = ["BranchGate", "DropPathAction", "DropSampler", "GateInfo", "MODES", "SCALES",
           "SAMPLE_IMPLS", "SharedUse"]

MODES = ("block", "sample")
SCALES = ("eval", "train", "none")
SAMPLE_IMPLS = ("subset", "mask")


class BranchGate(nn.Module):
    """Run or skip one residual branch; the add the branch used to feed happens here.

    Args:
        branch: the branch as a ``GraphModule`` taking ``(fork, *inputs)``. It is kept outside the
            module tree (it calls the model's own submodules, which already live in the tree), so
            the gate adds no parameters and no ``state_dict`` keys.
        drop_rate: probability of dropping the branch (block) or a row (sample) in training.
        sampler: the model's shared :class:`DropSampler`.
        identity: the skip is the fork itself; the gate is then called as ``gate(fork, *inputs)``
            instead of ``gate(skip, fork, *inputs)``.
        clone_on_drop: return a copy of the skip when dropping, because something later modifies
            the result in place (``ReLU(inplace=True)``) and must not modify the skip, which
            autograd may have saved. (A skip that is a view is always copied when dropped.)
        info: the site's description.
        mode: ``"block"`` or ``"sample"``.
        scale: ``"eval"``, ``"train"`` or ``"none"`` (see the module docstring).
        sample_impl: ``"subset"`` or ``"mask"`` (sample mode).
        note: why this gate is set up the way it is (shown in tables), e.g. why a sample-mode
            site uses ``mask``, or which drop-path op it adopted.
        rate_weight: the site's share of the model-wide rate: ``fxsd.set_drop_rate(gm, r)`` sets
            ``drop_rate = min(1, r * rate_weight)``.
        drop_path: what the rewrite did with a drop-path op in the branch, if it held one.
        record: the model's :class:`~fxsd.record.FxsdRecord`, shared by all its gates.
        escape_path: when the branch hands values to code outside it besides its output
            (:mod:`fxsd.analysis.escapes`), how a skipped branch produces them; ``branch`` then
            returns ``(output, *values)`` and the gate ``(sum, *values)``.
    """

    def __init__(
        self,
        branch: GraphModule,
        drop_rate: float,
        sampler: DropSampler,
        *,
        identity: bool,
        clone_on_drop: bool,
        info: GateInfo,
        mode: str = "block",
        scale: str = "train",
        sample_impl: str = "mask",
        note: str = "",
        rate_weight: float = 1.0,
        drop_path: DropPathAction | None = None,
        record: FxsdRecord | None = None,
        escape_path: EscapePath | None = None,
    ) -> None:
        super().__init__()
        self.__dict__["branch"] = branch  # deliberately not a registered submodule
        self.__dict__["escape_path"] = escape_path
        self.drop_rate = drop_rate
        self.sampler = sampler
        self.identity = identity
        self.clone_on_drop = clone_on_drop
        self.info = info
        self.mode = mode
        self.scale = scale
        self.sample_impl = sample_impl
        self.note = note
        self.rate_weight = float(rate_weight)
        self.drop_path = drop_path
        self.record = record
        self.dropped: bool | None = None  # block mode: decision of the last training forward
        self.kept_rows: torch.Tensor | None = None  # sample mode: row mask of the last forward

    @property
    def drop_rate(self) -> float:
        """Probability of dropping the branch (block) or a row (sample) in training. May be
        changed at any time; an assignment is checked (a number in [0, 1]:
        :func:`fxsd.arguments.check_rate`), since a rate past 1 would scale kept
        branches
        by a negative ``1 / (1 - p)``."""
        return self._drop_rate

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        info = self.__dict__.get("info")
        self._drop_rate = check_rate(value, f"drop_rate of gate '{info.name}'" if info and
                                     info.name else "drop_rate")

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "drop_rate" in state:  # pickled before the rate became a checked property
            state = {**state, "_drop_rate": state["drop_rate"]}
            del state["drop_rate"]
        super().__setstate__(state)

    def attach_parts(self, block: nn.Module) -> None:
        """Make ``block`` (the module whose code calls this gate) the host of the branch and
        the escape path: they call the block's children as the block holds them when they
        run (:class:`~fxsd.graph_module.HostedGraphModule`)."""
        state = self.__dict__
        branch = state["branch"]
        state["branch"] = branch.attach(block) if isinstance(branch, HostedGraphModule) \
            else branch
        if state["branch"] is not branch:  # a copy of the gate: its compiled branch is the other's
            state.pop("compiled_branch", None)
        if state.get("escape_path") is not None:
            state["escape_path"] = state["escape_path"].attach(block)

    @property
    def run_branch(self) -> Any:
        """The branch's forward: compiled by :func:`fxsd.compile`, else the GraphModule's."""
        compiled = self.__dict__.get("compiled_branch")
        return self.branch.forward if compiled is None else compiled

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("compiled_branch", None)  # compiled code neither copies nor pickles
        state.pop("_escaped", None)
        return state

    # The gate runs eagerly even inside torch.compile: its host-side draw and its Python branch
    # must happen at every call, not once at trace time. Compilation stops at each gate (a graph
    # break); fxsd.compile() compiles each branch on its own.
    @torch.compiler.disable
    def forward(self, skip: torch.Tensor, *inputs: Any) -> Any:
        shared = self.info.shared
        inputs, skips = self.info.split_skips(inputs)
        args = (skip, *inputs) if self.identity else inputs
        path = self.escape_path
        if path is None and not shared:
            return self._join(skip, args)
        # the branch hands values to code outside it: the sum, then those values (from the run
        # of the branch on the whole batch, else without the branch: fxsd.analysis.escapes), then
        # what the second joins its work feeds compute (fxsd.analysis.shared_work)
        self.__dict__.pop("_escaped", None)
        result = self._join(skip, args)
        escaped = self.__dict__.pop("_escaped", None)
        count = len(path.names) if path is not None else 0
        if escaped is None:  # skipped
            values = path(args, _shape_key(args), self.info) if path is not None else ()
            return (result, *values, *self._shared_dropped(args, skips))
        values, outs = escaped[:count], escaped[count:]
        return (result, *values, *self._shared_kept(args, outs, skips))

    def _shared_kept(self, args: tuple[Any, ...], outs: tuple[Any, ...],
                     skips: tuple[Any, ...]) -> list[Any]:
        """The second joins (and concatenations' operands) of a branch that ran, each branch
        term scaled as the first join's."""
        if outs:
            self.__dict__.setdefault("_shapes", {})[("shared", _shape_key(args))] = tuple(
                (o.shape, o.dtype, o.device) for o in outs)
        p, training = self.drop_rate, self.training
        scale: Any = branch_scale(p, self.scale, training)
        if training and self.mode == "sample":
            kept = self.kept_rows
            scale = row_factor(kept, p, self.scale, outs[0])
        results, skip_of = [], iter(skips)
        for use, out in zip(self.info.shared, outs):
            if isinstance(scale, torch.Tensor):
                out = out * scale.view((out.shape[0],) + (1,) * (out.dim() - 1))
            factor = 1.0 if isinstance(scale, torch.Tensor) else scale
            if use.kind is ShareKind.JOIN:
                results.append(use.join(next(skip_of), out, factor, training=training))
            else:
                results.append(out if factor == 1.0 else out * factor)
        return results

    def _shared_dropped(self, args: tuple[Any, ...], skips: tuple[Any, ...]) -> list[Any]:
        """What the second joins compute without the work: each its skip; a concatenation's
        operand zeros (shaped as remembered from a run, else from an abstract run)."""
        results, skip_of = [], iter(skips)
        specs = None
        for i, use in enumerate(self.info.shared):
            if use.kind is ShareKind.JOIN:
                results.append(self._skip(next(skip_of), use.join))
                continue
            if specs is None:
                specs = self._shared_specs(args)
            shape, dtype, device = specs[i]
            results.append(torch.zeros(shape, dtype=dtype, device=device))
        return results

    def _shared_specs(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        shapes = self.__dict__.setdefault("_shapes", {})
        key = ("shared", _shape_key(args))
        if key not in shapes:
            out = abstract_run(self.branch, args)
            shapes[key] = tuple(out[-len(self.info.shared):])
        return shapes[key]

    @property
    def escape_path(self) -> EscapePath | None:
        """How a skipped branch produces the values it hands to code outside it (``None``:
        it hands none)."""
        return self.__dict__.get("escape_path")

    def undrawn(self, skip: torch.Tensor, *inputs: Any) -> Any:
        """What the gate returns with its branch run and nothing drawn or scaled."""
        shared = self.info.shared
        inputs, skips = self.info.split_skips(inputs)
        out = self._branch((skip, *inputs) if self.identity else inputs)
        result = self.info.join(skip, out)
        escaped = self.__dict__.pop("_escaped", None)
        if escaped is None:
            return result
        if not shared:
            return (result, *escaped)
        count = len(escaped) - len(shared)
        skip_of = iter(skips)
        uses = [use.join(next(skip_of), o) if use.kind is ShareKind.JOIN else o
                for use, o in zip(shared, escaped[count:])]
        return (result, *escaped[:count], *uses)

    def _branch(self, args: tuple[Any, ...], whole: bool = True) -> torch.Tensor:
        """The branch's output on ``args``; the values it hands on are kept for the gate's
        result when it ran on the ``whole`` batch."""
        out = self.run_branch(*args)
        if self.escape_path is None and not self.info.shared:
            return out
        if whole:
            self.__dict__["_escaped"] = tuple(out[1:])
        return out[0]

    def _join(self, skip: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
        join = self.info.join
        if join.needs_branch_shape:
            return self._partial(skip, args)
        p = self.drop_rate
        if not self.training:
            if self.scale != "eval" or p == 0.0:
                return join.plain(skip, self._branch(args))
            if p == 1.0:
                return self._skip(skip)
            return join(skip, self._branch(args), branch_scale(p, self.scale, False))
        if self.mode == "sample":
            return self._sample(skip, args)
        self.dropped = decide(self, self._draw_block)
        if self.dropped:
            return self._skip(skip)
        return join(skip, self._branch(args), branch_scale(p, self.scale, True), training=True)

    def _draw_block(self) -> bool:
        return self.sampler.random() < self.drop_rate

    def _draw_rows(self, n: int) -> torch.Tensor:
        return self.sampler.rows(n) >= self.drop_rate

    def _skip(self, skip: torch.Tensor, join: Join | None = None) -> torch.Tensor:
        """The join (``join``, default the site's) without the branch: the skip (or ``alpha *
        skip`` where the source's alpha scales it), copied where it must not be handed on."""
        # A view is copied too: handing it on would make the block's output alias storage it
        # does not own (FSDP2 passes a block's inputs through an autograd function, so an
        # identity skip arrives as a view, and FSDP2 warns about blocks that return one).
        result = (join or self.info.join).without_branch(skip)
        if result is not skip:
            return result
        return skip.clone() if self.clone_on_drop or skip._is_view() else skip

    def _sample(self, skip: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
        p, join = self.drop_rate, self.info.join
        fork = args[0]
        n = fork.shape[0]
        kept = decide(self, lambda: self._draw_rows(n))  # host-side draws: no device sync
        self.kept_rows = kept
        if self.sample_impl == "subset":
            scale = branch_scale(p, self.scale, True)
            index = kept.nonzero().flatten()
            if len(index) == 0:
                return self._skip(skip)
            if len(index) == n:
                return join(skip, self._branch(args), scale, training=True)
            index = index.to(fork.device, non_blocking=True)
            out = self._branch((fork.index_select(0, index), *args[1:]), whole=False)
            return join.at_rows(skip, index, out, scale)
        out = self._branch(args)
        factor = row_factor(kept, p, self.scale, out)
        return join(skip, out * factor.view((n,) + (1,) * (out.dim() - 1)))

    # -- a join into part of the branch output (fxsd.tracing.partial_join)
    # ---------------------------
    def _partial(self, skip: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
        """The branch output (scaled as the gate scales; zeros where dropped) with the skip
        added into its slice: what the model computes with a drop path in front of the
        slices."""
        p, join = self.drop_rate, self.info.join
        if not self.training:
            if self.scale == "eval" and p == 1.0:
                return join(skip, self._zeros(args))
            return join(skip, self._run(args), branch_scale(p, self.scale, False))
        scale = branch_scale(p, self.scale, True)
        if self.mode == "sample":
            return join(skip, self._partial_rows(args, scale))
        self.dropped = decide(self, self._draw_block)
        if self.dropped:
            return join(skip, self._zeros(args))
        return join(skip, self._run(args), scale, training=True)

    def _partial_rows(self, args: tuple[Any, ...], scale: float) -> torch.Tensor:
        """Sample mode: the branch output with dropped rows zero, kept rows scaled."""
        fork = args[0]
        n = fork.shape[0]
        kept = decide(self, lambda: self._draw_rows(n))
        self.kept_rows = kept
        if self.sample_impl == "subset":
            index = kept.nonzero().flatten()
            if len(index) == n:
                out = self._run(args)
                return out if scale == 1.0 else out * scale
            full = self._zeros(args)
            if len(index) == 0:
                return full
            index = index.to(fork.device, non_blocking=True)
            out = self._branch((fork.index_select(0, index), *args[1:]), whole=False)
            return torch.index_add(full, 0, index, out, alpha=scale)
        out = self._run(args)
        factor = row_factor(kept, self.drop_rate, self.scale, out)
        return out * factor.view((n,) + (1,) * (out.dim() - 1))

    def _run(self, args: tuple[Any, ...]) -> torch.Tensor:
        """The branch's output; its shape is remembered for a dropped call."""
        out = self._branch(args)
        self.__dict__.setdefault("_shapes", {})[_shape_key(args)] = \
            (out.shape, out.dtype, out.device)
        return out

    def _zeros(self, args: tuple[Any, ...]) -> torch.Tensor:
        """Zeros shaped as the branch's output on ``args``: remembered from a run on inputs of
        these shapes, else from an abstract run of the branch (fake tensors: nothing computed)."""
        shapes = self.__dict__.setdefault("_shapes", {})
        key = _shape_key(args)
        if key not in shapes:
            out = abstract_run(self.branch, args)
            shapes[key] = out if isinstance(out, TensorSpec) else out[0]
        shape, dtype, device = shapes[key]
        return torch.zeros(shape, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        i = self.info
        text = (f"'{i.name or i.module_path or '<root>'}', depth={i.depth}/{i.num_levels}, "
                f"drop_rate={self.drop_rate:.4g}, skip={i.skip_kind}")
        if self.mode != "block":
            text += f", mode={self.mode}/{self.sample_impl}"
        if self.scale != "train":
            text += f", scale={self.scale}"
        return text


def _shape_key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a branch's output shape depends on: its inputs' shapes, dtypes and devices, other
    inputs' values where they can be compared, and autocast."""
    key: list[Any] = [torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")]
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.dtype, a.device))
        elif a is None or isinstance(a, (bool, int, float, str)):
            key.append(a)
        else:
            key.append(id(a))
    return tuple(key)
