"""Deployment at any depth: fxsd.prune removes residual branches to an inference FLOP budget.

Modules are imported by their full path (``fxsd.pruning.prune.<module>``); docs/design.md has the
map.
"""

from fxsd._lazy import submodules

__getattr__ = submodules(__name__)
