"""The rewrite behind :func:`fxsd.prune`: a gated model, stripped, with some branches removed.

Each removed site's join returns what the join computes without its branch
(:meth:`fxsd.runtime.join.Join.without_branch`: the skip, or its projection where the skip has one);
every other gate becomes its eval computation, exactly as :func:`fxsd.strip` gives it. The rewrite
goes through ``strip`` itself: on a copy of the gated tree, each removed gate is set to
``scale="eval"`` at rate 1, the one setting at which strip writes the join without its branch.
Then the modules and attributes the removed branches read (their ``torch.fx`` targets, relative to
the block owning the gate) leave the block, unless code the block still runs reads them too, so
their ``state_dict`` keys are gone and every other key is unchanged.

>>> import torch, torchvision, fxsd
>>> from fxsd.passes.prune_branches import remove_branches
>>> gated = fxsd.stochastic_depth(torchvision.models.resnet18(), 0.1)
>>> pruned = remove_branches(gated, ["layer4.1.residual_gate"])
>>> sorted(k for k in gated.state_dict() if k not in pruned.state_dict())[:2]
['layer4.1.bn1.bias', 'layer4.1.bn1.num_batches_tracked']
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.fx import Graph

from fxsd.errors import InvalidArgumentError
from fxsd.module_tree import copy_tree
from fxsd.passes.strip_gates import strip
from fxsd.runtime.accessors import named_gates
from fxsd.runtime.gate import BranchGate

__all__ = ["remove_branches", "branch_targets"]


def remove_branches(gated: nn.Module, removed: Iterable[str]) -> nn.Module:
    """``fxsd.strip(gated)`` with the branches of the gates named in ``removed`` taken out.

    Args:
        gated: a model returned by :func:`fxsd.stochastic_depth`; it is not modified (the result
            is a new module tree over its parameter and buffer tensors, like ``strip``'s).
        removed: qualified gate names (``layer4.1.residual_gate``). A gate nested in a removed
            branch goes with it.

    Raises:
        InvalidArgumentError: a name is not one of ``gated``'s gates, or names a gate whose join
            needs its branch even without it (a join into part of the branch output, or a
            branch that hands values on): removing it would save nothing.
    """
    found = named_gates(gated)
    names = list(dict.fromkeys(removed))
    for name in names:
        if name not in found:
            raise InvalidArgumentError(
                f"'{name}' is not a gate of {type(gated).__name__}; its gates are "
                f"{_some(found)} (fxsd.table(model) lists them)")
        why = unremovable(found[name])
        if why:
            raise InvalidArgumentError(f"gate '{name}' cannot be removed: {why}")
    work = copy_tree(gated)
    work_gates = named_gates(work)
    for name in names:
        gate = work_gates[name]
        gate.scale, gate.drop_rate = "eval", 1.0  # strip then writes the join without its branch
    pruned = strip(work)
    for block_path, targets in _targets_by_block(work, names).items():
        try:
            block = pruned.get_submodule(block_path)
        except AttributeError:  # inside a removed branch of an outer block: already gone
            continue
        _drop_unused(block, targets)
    return pruned


def unremovable(gate: BranchGate) -> str:
    """Why removing ``gate``'s branch would save nothing (``""``: it would not)."""
    if gate.info.join.needs_branch_shape:
        return ("its join adds the skip into part of the branch output, so the branch must run "
                "for its shape")
    if gate.escape_path is not None:
        return "its branch hands values to code outside it, so it must run for them"
    return ""


def branch_targets(block: nn.Module, graph: Graph) -> set[str]:
    """The attributes of ``block`` a branch ``graph`` reads (modules it calls, parameters and
    buffers it fetches), those of the gates nested in it included; the gates themselves are
    left out (strip removes them)."""
    targets: set[str] = set()
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)
        module = _resolve(block, target)
        if isinstance(module, BranchGate):
            targets |= branch_targets(block, module.branch.graph)
        else:
            targets.add(target)
    return targets


def _targets_by_block(work: nn.Module, names: list[str]) -> dict[str, set[str]]:
    by_block: dict[str, set[str]] = {}
    for name in names:
        block_path = name.rpartition(".")[0]
        block = work.get_submodule(block_path)
        gate = work.get_submodule(name)
        by_block.setdefault(block_path, set()).update(branch_targets(block, gate.branch.graph))
    return by_block


def _resolve(block: nn.Module, target: str) -> object:
    value: object = block
    for atom in target.split("."):
        value = getattr(value, atom, None)
    return value


def _drop_unused(block: nn.Module, targets: set[str]) -> None:
    """Delete ``targets`` from ``block`` where its (stripped) graph reads them no more, then the
    containers this left without state or use."""
    graph = getattr(block, "graph", None)
    used = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")} \
        if isinstance(graph, Graph) else set()

    def in_use(path: str) -> bool:
        return any(u == path or u.startswith(path + ".") or path.startswith(u + ".")
                   for u in used)

    parents: set[str] = set()
    for target in sorted(targets, key=lambda t: -t.count(".")):
        if in_use(target) or _resolve(block, target) is None:
            continue
        owner, _, attr = target.rpartition(".")
        delattr(block.get_submodule(owner), attr)
        while owner:
            parents.add(owner)
            owner = owner.rpartition(".")[0]
    for path in sorted(parents, key=lambda t: -t.count(".")):
        module = _resolve(block, path)
        if isinstance(module, nn.Module) and not in_use(path) and _stateless(module):
            owner, _, attr = path.rpartition(".")
            delattr(block.get_submodule(owner), attr)


def _stateless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def _some(found: dict[str, BranchGate], limit: int = 4) -> str:
    names = list(found)
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(f"'{n}'" for n in names[:limit]) + more
