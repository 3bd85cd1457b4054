"""Apply drop path the way users do today: multiply each computed branch by a random row mask.

This is the comparison point for fxsd's gates: every residual site found by the analysis gets a
``torchvision.ops.StochasticDepth(p_l, "row")`` on its branch output, just before the add, at the
same per-site rates fxsd would use. The branch is always computed, so nothing is saved; kept rows
are scaled by ``1 / (1 - p_l)`` in training and eval is the identity (torchvision's semantics).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule

from fxsd.analysis.sites import ResidualAnalysis
from fxsd.graph_names import free_name

__all__ = ["add_mask_drop_paths"]


def add_mask_drop_paths(analysis: ResidualAnalysis, rates: Sequence[float]) -> GraphModule:
    """Insert a ``StochasticDepth(rate, "row")`` module on each site's branch output.

    Edits ``analysis.graph_module`` in place and returns it. Modules are registered on the root
    as ``<block>_drop_path`` and hold no parameters, so ``state_dict`` keys do not change.
    """
    from torchvision.ops import StochasticDepth

    gm = analysis.graph_module
    for site, rate in zip(analysis.sites, rates):
        base = site.module_path.replace(".", "_")
        name = free_name(gm, f"{base}_drop_path" if base else "drop_path")
        gm.add_submodule(name, StochasticDepth(float(rate), "row"))
        with gm.graph.inserting_before(site.add):
            masked = gm.graph.call_module(name, (site.branch_output,))
        site.add.replace_input_with(site.branch_output, masked)
    gm.graph.lint()
    gm.recompile()
    return gm
