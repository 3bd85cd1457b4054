"""What each gate will do, decided once, before any graph surgery.

:func:`plan_gates` turns an analysis (:func:`fxsd.analyze_residuals`) and the user's validated
:class:`Options` into one :class:`GateSpec` per residual site — its drop rate, mode, scaling,
sample implementation, what happens to the model's own drop there (a drop path in its branch,
a layer drop around it), whether a dropped gate copies its skip, where its eval scale folds, and
the note tables show — and which of the model's own layer-drop loops go off
(:class:`LayerDropPlan`). :mod:`fxsd.passes.gate_residuals` then only applies the plan.
Planning reads the graphs; it never changes them or the model.

The rules, in one place:

* **Rates** follow ``distribution`` over the sites' depths
(:func:`fxsd.decisions.distributions.site_rates`);
  each spec keeps its ``rate_weight`` (its rate over the model-wide rate), so
  :func:`fxsd.set_drop_rate` and the schedules rescale the same shape.
* **Explicit beats adopted.** With ``existing="adopt"``, a model's own drops are adopted by
  one rule (:func:`_adopt`), whichever kind (:class:`~fxsd.tracing.drop_paths.OwnDrop`): a
  drop-path op ending the site's branch (:mod:`fxsd.tracing.drop_paths`) or, where the branch
  has no drop path, a layer drop around the site (Hugging Face's ``layerdrop``,
  :mod:`fxsd.tracing.layer_drop`: block mode, unscaled). With no rate or distribution given,
  the model keeps its own regularisation: a site takes its own drop's rate; sites without an
  own drop get rate 0; the model-wide rate is the largest own rate. Given a rate, fxsd's rates
  apply everywhere ("rate replaced"). ``mode``/``scale`` given apply everywhere; otherwise an
  adopted drop's own, else ``"block"`` and ``"train"``.
* **Sample mode** runs each branch on the kept rows only (``"subset"``) where that is exact —
  the branch treats batch rows independently (:func:`fxsd.analysis.rows.row_coupling`) — else
  multiplies by the row mask (``"mask"``, noted in the table); ``sample_impl="subset"`` where rows
  are coupled is an error. An *adopted* per-row drop path on such a branch runs in block mode
  instead (the mask would save nothing), unless ``mode`` or ``sample_impl`` is given.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxsd.analysis.fold_targets import fold_target
from fxsd.analysis.rows import row_coupling
from fxsd.analysis.sites import ResidualAnalysis, ResidualSite
from fxsd.arguments import (
    LeafSpec,
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_rate,
    check_trace_arguments,
    close_matches,
)
from fxsd.decisions.distributions import (
    DEFAULT_DROP_RATE,
    Distribution,
    check_distribution,
    site_rates,
)
from fxsd.errors import InvalidArgumentError, InvalidTypeError
from fxsd.runtime.folding import FoldTarget
from fxsd.runtime.gate import MODES, SAMPLE_IMPLS, SCALES
from fxsd.runtime.gate_info import DropPathAction
from fxsd.tracing.drop_paths import OwnDrop, is_drop_path, own_drop_path
from fxsd.tracing.layer_drop import LayerDrop, layer_drop_of
from fxsd.tracing.ops import depends_on_input, is_view, mutated_operand, node_order

__all__ = ["Options", "GateSpec", "GatePlan", "LayerDropPlan", "plan_gates", "select_sites",
           "join_notes", "EXISTING"]

EXISTING = ("adopt", "replace", "keep")


@dataclass(frozen=True)
class Options:
    """The options of :func:`fxsd.stochastic_depth`, validated (see its docstring for each).

    ``explicit``: a ``drop_rate`` or ``distribution`` was given, so fxsd's rates beat a model's
    own drop paths. Build with :meth:`validated`.
    """

    drop_rate: float = DEFAULT_DROP_RATE
    distribution: Distribution = "linear"
    explicit: bool = False
    mode: str | None = None
    scale: str | None = None
    sample_impl: str | None = None
    existing: str = "adopt"
    seed: int | None = None
    sync_ranks: bool = True
    select: Callable[[ResidualSite], bool] | None = None
    inplace: bool = False
    example_inputs: Sequence[Any] | None = None
    example_kwargs: dict[str, Any] | None = field(default=None, hash=False)
    tracing: str = "auto"
    leaf_modules: Iterable[LeafSpec] | None = None
    concrete_args: dict[str, Any] | None = field(default=None, hash=False)
    target_saving: float | None = None
    verify: bool = True

    @classmethod
    def validated(cls, drop_rate: float | None = None,
                  distribution: Distribution | None = None,
                  target_saving: float | None = None, *, model: nn.Module | None = None,
                  **options: Any) -> Options:
        """The options, each checked by type and value before any work
        (``InvalidArgumentError`` / ``InvalidTypeError`` naming the option and what it takes);
        defaults filled in. With ``model``, the tracing options are checked against it too
        (``leaf_modules`` names, ``concrete_args`` names, the example call:
        :func:`fxsd.arguments.check_trace_arguments`, which the analysis also runs).

        ``target_saving`` replaces ``drop_rate`` (the two are refused together) and, like an
        explicit rate, sets every site's rate: the plan lays out the distribution's shape, and
        :func:`fxsd.decisions.budget.scale_to_target` scales it once the branches' costs are
        counted. A per-site ``distribution`` (a sequence or callable) gives every rate itself, so a
        ``drop_rate`` beside it is refused too.
        """
        unknown = set(options) - set(_NAMES)
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidTypeError(f"unexpected option {name!r}{close_matches(name, _NAMES)}")
        _check_rates(drop_rate, distribution, target_saving, options)
        trace = check_trace_arguments(
            model, options.get("example_inputs"), options.get("example_kwargs"),
            options.get("tracing", "auto"), options.get("leaf_modules"),
            options.get("concrete_args"))
        select = options.get("select")
        checked = dict(
            mode=check_choice(options.get("mode"), "mode", MODES, optional=True),
            scale=check_choice(options.get("scale"), "scale", SCALES, optional=True),
            sample_impl=check_choice(options.get("sample_impl"), "sample_impl", SAMPLE_IMPLS,
                                     optional=True),
            existing=check_choice(options.get("existing", "adopt"), "existing", EXISTING),
            seed=check_int(options.get("seed"), "seed", optional=True),
            sync_ranks=check_bool(options.get("sync_ranks", True), "sync_ranks"),
            inplace=check_bool(options.get("inplace", False), "inplace"),
            verify=check_bool(options.get("verify", True), "verify"),
            select=None if select is None else
            check_callable(select, "select", "select(site) -> bool", 1),
            example_inputs=trace.example_inputs, example_kwargs=trace.example_kwargs,
            tracing=trace.tracing, leaf_modules=tuple(trace.leaf_modules) or None,
            concrete_args=trace.concrete_args)
        return cls(drop_rate=check_rate(DEFAULT_DROP_RATE if drop_rate is None else drop_rate),
                   distribution="linear" if distribution is None else distribution,
                   explicit=(drop_rate is not None or distribution is not None
                             or target_saving is not None),
                   target_saving=None if target_saving is None else float(target_saving),
                   **checked)


_NAMES = ("drop_rate", "target_saving", "distribution", "mode", "scale", "sample_impl",
          "existing", "seed", "sync_ranks", "select", "inplace", "example_inputs",
          "example_kwargs", "tracing", "leaf_modules", "concrete_args", "verify")


def _check_rates(drop_rate: object, distribution: object, target_saving: object,
                 options: dict[str, Any]) -> None:
    """The rate options: each on its own, and the combinations that contradict each other."""
    if drop_rate is not None:
        check_rate(drop_rate)
    if distribution is not None:
        check_distribution(distribution)
        if drop_rate is not None and not isinstance(distribution, str):
            raise InvalidArgumentError(
                f"give drop_rate= or a per-site distribution=, not both (got drop_rate="
                f"{drop_rate!r} and a {type(distribution).__name__} distribution): a sequence or "
                "callable gives every site its rate itself. Leave drop_rate out (the model-wide "
                "rate is then the largest site rate; fxsd.set_drop_rate scales them all)")
    if target_saving is not None:
        if drop_rate is not None:
            raise InvalidArgumentError(
                f"give drop_rate= or target_saving=, not both (got drop_rate={drop_rate!r}, "
                f"target_saving={target_saving!r}): a target sets the rates itself")
        check_rate(target_saving, "target_saving")
        if options.get("example_inputs") is None and options.get("example_kwargs") is None:
            raise InvalidArgumentError(
                "target_saving needs example_inputs= (and example_kwargs=): one forward "
                "call's inputs, on which fxsd counts the FLOPs of a training step")


@dataclass(frozen=True)
class GateSpec:
    """What one site's gate does.

    Attributes:
        drop_rate: its drop rate; ``rate_weight``: that rate over the model-wide rate.
        mode, scale, sample_impl: as :class:`~fxsd.runtime.gate.BranchGate` takes them, resolved.
        drop_path: what happened to a drop path already in the branch (``None``: there is none).
        drops: the drop-path nodes to remove from the branch (in the analysed graph).
        note: what the table's note column says (before the rewrite's own remarks);
            ``sample_note``: why a sample-mode site uses a mask.
        clone_on_drop: a dropped gate copies the skip (something later writes to it in place).
        fold: where the eval scale folds (:func:`fxsd.plain_state_dict`).
        row_drops_blocked: an adopted per-row drop path runs in block mode, because its branch
            mixes batch rows and per-row drops (the mask) would save no compute.
    """

    drop_rate: float
    rate_weight: float
    mode: str | None = "block"  # None only while planning: the user's option not given
    scale: str | None = "train"
    sample_impl: str = "mask"
    drop_path: DropPathAction | None = None
    drops: tuple[Node, ...] = ()
    note: str = ""
    sample_note: str = ""
    clone_on_drop: bool = False
    fold: FoldTarget | None = None
    row_drops_blocked: bool = False


@dataclass(frozen=True)
class LayerDropPlan:
    """What the rewrite does with one of the model's own layer drops.

    Attributes:
        drop: the layer drop (:func:`fxsd.tracing.layer_drop.find_layer_drops`).
        gated: a gated site lies inside its layers.
        switch_off: its loop goes off in the result (gated, and ``existing`` is not
            ``"keep"``): fxsd's gates drop those layers now, adopted or at fxsd's rates.
    """

    drop: LayerDrop
    gated: bool
    switch_off: bool


@dataclass
class GatePlan:
    """Every site's :class:`GateSpec` (by ``id(site)``), the model-wide rate, and what becomes
    of the model's own layer drops."""

    drop_rate: float
    specs: dict[int, GateSpec]
    layer_drops: tuple[LayerDropPlan, ...] = ()

    def spec(self, site: ResidualSite) -> GateSpec:
        return self.specs[id(site)]


def select_sites(analysis: ResidualAnalysis, keep: Callable[[ResidualSite], bool]) -> None:
    """Keep only the sites ``keep`` selects, with depths ``1..L`` counted over them."""
    chosen = [site for site in analysis.sites if _selected(keep, site)]
    distinct = sorted({site.depth for site in chosen})
    rank_of = {d: i + 1 for i, d in enumerate(distinct)}
    renumbered = {id(site): replace(site, depth=rank_of[site.depth]) for site in chosen}
    for part in {id(p): p for p in (analysis, *analysis.units)}.values():
        part.sites = [renumbered[id(s)] for s in part.sites if id(s) in renumbered]
    analysis.num_levels = len(distinct)


def _selected(keep: Callable[[ResidualSite], bool], site: ResidualSite) -> bool:
    try:
        answer = keep(site)
    except TypeError as exc:
        raise InvalidTypeError(
            f"select(site) raised TypeError for '{site.name}' in "
            f"'{site.module_path or '<root>'}': {exc}. select is called with one "
            "fxsd.ResidualSite and returns True to gate it") from exc
    if not isinstance(answer, bool):
        raise InvalidTypeError(
            f"select must return True or False for each site; for '{site.name}' in "
            f"'{site.module_path or '<root>'}' it returned {answer!r} "
            f"({type(answer).__name__}). Return a bool, e.g. bool(...)")
    return answer


def plan_gates(analysis: ResidualAnalysis, options: Options,
               layer_drops: Sequence[LayerDrop] = ()) -> GatePlan:
    """Each site's :class:`GateSpec` under ``options`` (see the module docstring).

    ``layer_drops``: the model's own layer drops
    (:func:`fxsd.tracing.layer_drop.find_layer_drops`), adopted like drop paths; the plan says
    which of them the rewrite switches off."""
    model_rate, rates, weights = _rates(analysis, options)
    facts = [_GraphFacts(part, options, layer_drops) for part in analysis.parts()]
    sited = [(f, site) for f in facts for site in f.analysis.sites]
    adopting = options.existing == "adopt" and not options.explicit and any(
        f.has_own_drop(site) for f, site in sited)
    drop_rate = model_rate
    if adopting:  # the model-wide rate is the largest rate of the model's own drops
        drop_rate = max((own.settings.rate for f, site in sited for own in f.own_drops(site)),
                        default=0.0)
    rate_of = {id(site): (r, w) for site, r, w in zip(analysis.sites, rates, weights)}
    specs = {id(site): f.spec(site, *rate_of[id(site)], drop_rate, adopting)
             for f, site in sited}
    settled = []
    for drop in layer_drops:
        gated = any(layer_drop_of(s.module_path, s.scope, [drop]) for s in analysis.sites)
        settled.append(LayerDropPlan(drop, gated, gated and options.existing != "keep"))
    return GatePlan(drop_rate, specs, tuple(settled))


def _adopt(spec: GateSpec, own: OwnDrop, explicit: bool, model_rate: float) -> GateSpec:
    """``spec`` taking over a drop the model already does at its site, whichever kind: the
    drop's rate and its weight against the model-wide rate (unless rates are ``explicit``: the
    note then says the rate was replaced), its mode and scaling (unless given), and a note."""
    rate, weight, note = spec.drop_rate, spec.rate_weight, f"adopted {own.label}"
    if explicit:
        note += ", rate replaced"
    else:
        rate = own.settings.rate
        weight = rate / model_rate if model_rate > 0 else rate
    return replace(spec, drop_rate=rate, rate_weight=weight, mode=spec.mode or own.settings.mode,
                   scale=spec.scale or own.settings.scale, note=join_notes(spec.note, note))


def join_notes(*notes: str) -> str:
    """Notes of a table's note column as one (any may be empty)."""
    return "; ".join(n for n in notes if n)


def _rates(analysis: ResidualAnalysis, options: Options
           ) -> tuple[float, list[float], list[float]]:
    """The model-wide rate, each site's rate from the distribution, and its weight (rate over
    the model-wide rate; the distribution's shape at rate 1 when the rate is 0). A per-site
    distribution (a sequence, a callable) sets the rates itself: the model-wide rate is then the
    largest of them, so that :func:`fxsd.get_drop_rate` reports what the model does."""
    depths = [s.depth for s in analysis.sites]
    rates = site_rates(options.drop_rate, options.distribution, depths, analysis.num_levels)
    model_rate = options.drop_rate
    if not isinstance(options.distribution, str):
        model_rate = max(rates, default=0.0)
    if model_rate > 0:
        weights = [r / model_rate for r in rates]
    elif isinstance(options.distribution, str):
        weights = site_rates(1.0, options.distribution, depths, analysis.num_levels)
    else:
        weights = list(rates)
    return model_rate, rates, weights


class _GraphFacts:
    """What the plan reads about each site of one analysed graph: the drops the model already
    does there, whether in-place ops follow the join, whether its branch mixes batch rows."""

    def __init__(self, analysis: ResidualAnalysis, options: Options,
                 layer_drops: Sequence[LayerDrop] = ()) -> None:
        self.analysis = analysis
        self.options = options
        self.layer_drops = layer_drops
        self.gm = analysis.graph_module
        self.order = analysis.order or node_order(self.gm.graph)

    def drop_paths(self, site: ResidualSite) -> list[Node]:
        return [n for n in site.branch if n.op == "call_module"
                and is_drop_path(self.gm.get_submodule(str(n.target)))]

    def has_drop_path(self, site: ResidualSite) -> bool:
        return bool(self.drop_paths(site))

    def layer_drop(self, site: ResidualSite) -> LayerDrop | None:
        """The model's own layer drop around the site (only under ``existing="adopt"``: the
        other choices leave the site to fxsd; the rewrite still switches the loop off)."""
        if self.options.existing != "adopt":
            return None
        return layer_drop_of(site.module_path, site.scope, self.layer_drops)

    def has_own_drop(self, site: ResidualSite) -> bool:
        """Whether the model drops at the site itself: a drop path in its branch (adoptable or
        not) or a layer drop around it."""
        return self.has_drop_path(site) or self.layer_drop(site) is not None

    def adoptable(self, site: ResidualSite) -> OwnDrop | None:
        """The site's single drop path at its branch output, as an own drop to adopt."""
        if self.options.existing != "adopt":
            return None
        drops = self.drop_paths(site)
        if len(drops) != 1 or not _on_output_path(drops[0], site.branch_output):
            return None
        return own_drop_path(self.gm.get_submodule(str(drops[0].target)))

    def own_drops(self, site: ResidualSite) -> list[OwnDrop]:
        """The model's own drops at the site that could be adopted, the drop path first."""
        layer = self.layer_drop(site)
        found = (self.adoptable(site), None if layer is None else layer.own)
        return [own for own in found if own is not None]

    def spec(self, site: ResidualSite, rate: float, weight: float, model_rate: float,
             adopting: bool) -> GateSpec:
        spec = GateSpec(rate, weight, self.options.mode, self.options.scale)
        if adopting and not self.has_own_drop(site):
            # A model that carries its own drops keeps its own regularisation under "adopt":
            # sites without one had rate 0 in the model, and keep it.
            spec = replace(spec, drop_rate=0.0, rate_weight=0.0)
        spec = self.own_drop_plan(site, spec, model_rate)
        if adopting and spec.drop_path is DropPathAction.KEPT:
            # The model's own drop path stays and regularises this site: no second one on top.
            spec = replace(spec, drop_rate=0.0, rate_weight=0.0, note=spec.note + "; fxsd rate 0")
        spec = replace(spec, mode=spec.mode or "block", scale=spec.scale or "train",
                       clone_on_drop=_needs_clone(self.gm, site.add, site.skip, self.order),
                       fold=fold_target(self.gm, site))
        return self.sample_plan(site, spec)

    def own_drop_plan(self, site: ResidualSite, spec: GateSpec, model_rate: float
                      ) -> GateSpec:
        """What to do with the drops the model already does at the site: a drop path in the
        branch decides (kept, replaced or adopted); else a layer drop around the site is
        adopted (:func:`_adopt`, the one rule for both)."""
        if self.has_drop_path(site):
            return self.drop_path_plan(site, spec, model_rate)
        layer = self.layer_drop(site)
        if layer is None:
            return spec
        return _adopt(spec, layer.own, self.options.explicit, model_rate)

    def drop_path_plan(self, site: ResidualSite, spec: GateSpec, model_rate: float
                       ) -> GateSpec:
        """What to do with the drop-path ops of the site's branch: keep, replace or adopt
        them (:func:`_adopt`; adopted, the ops are taken out in the cut)."""
        drops = self.drop_paths(site)
        existing, explicit = self.options.existing, self.options.explicit
        if existing == "keep":
            return replace(spec, drop_path=DropPathAction.KEPT, note="kept existing drop path")
        own = self.adoptable(site)
        if own is None:
            if existing == "adopt" and not explicit:
                return replace(spec, drop_path=DropPathAction.KEPT, note="kept existing drop "
                               "path (not a single op at the branch output)")
            return replace(spec, drop_path=DropPathAction.REPLACED, drops=tuple(drops),
                           note="replaced existing drop path")
        return replace(_adopt(spec, own, explicit, model_rate), drop_path=DropPathAction.ADOPTED,
                       drops=tuple(drops))

    def sample_plan(self, site: ResidualSite, spec: GateSpec) -> GateSpec:
        """The sample implementation: subset where the branch treats rows independently.

        An adopted per-row drop path whose branch mixes rows (BatchNorm) would need the mask,
        which computes every row and saves nothing: unless ``mode`` or ``sample_impl`` is given,
        such a site runs in block mode instead (docs/training.md says why)."""
        chosen = self.options.sample_impl
        if spec.mode != "sample":
            return replace(spec, sample_impl=chosen or "mask")
        coupling = row_coupling(self.gm, site.fork, site.branch, site.side_inputs)
        if not coupling and site.escapes is not None and site.escapes.shared:
            coupling = "its work feeds a second join, which takes the rows the first takes"
        if coupling and chosen is None and self.options.mode is None \
                and spec.drop_path is DropPathAction.ADOPTED:
            return replace(spec, mode="block", sample_impl="mask", row_drops_blocked=True,
                           note=join_notes(spec.note, "block mode: per-row drops would save "
                                           f"nothing ({coupling}); mode='sample' keeps them"))
        if chosen is None:
            return replace(spec, sample_impl="mask" if coupling else "subset",
                           sample_note=f"mask: {coupling}" if coupling else "")
        if chosen == "subset" and coupling:
            raise InvalidArgumentError(
                f"sample_impl='subset' would change what '{site.module_path or '<root>'}' "
                f"computes: {coupling}. Use sample_impl=None to fall back to 'mask' there.")
        return replace(spec, sample_impl=chosen)


def _on_output_path(node: Node, out: Node) -> bool:
    """Whether ``node`` reaches ``out`` through per-row-neutral scalings only (layer scale)."""
    while node is not out:
        users = list(node.users)
        if len(users) != 1:
            return False
        (user,) = users
        if not (user.op == "call_function" and user.target in (operator.mul, torch.mul)
                or user.op == "call_method" and user.target in ("mul", "mul_")):
            return False
        if any(depends_on_input(a) for a in user.all_input_nodes if a is not node):
            return False  # scaled by an activation, not a parameter: the mask would not commute
        node = user
    return True


def _needs_clone(gm: GraphModule, add: Node, skip: Node, order: dict[Node, int]) -> bool:
    """Whether a dropped gate must copy the skip rather than return it.

    Returning the skip itself makes the result alias it. That is harmless unless something
    later writes to the result (or to the skip) in place, which would also overwrite a tensor
    autograd may have saved, or unless it would hand the caller back its own input.
    """
    if skip.op == "placeholder":
        return True
    return _mutated_after(gm, add, order[add], order) or _mutated_after(gm, skip, order[add], order)


def _mutated_after(gm: GraphModule, node: Node, after: int, order: dict[Node, int]) -> bool:
    """Whether an op after position ``after`` writes in place to ``node`` or a view of it."""
    stack, seen = [node], {node}
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op == "output" or order.get(user, after + 1) <= after:
                continue
            if mutated_operand(user, gm) is n:
                return True
            if is_view(user) and user not in seen:
                seen.add(user)
                stack.append(user)
    return False
