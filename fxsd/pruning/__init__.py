"""Deployment at any depth: fxsd.prune removes residual branches to an inference FLOP budget.

Modules are imported by their full path (``fxsd.pruning.prune.<module>``); docs/design.md has the
map.
"""

from fxsd import _submodules

__getattr__ = _submodules(__name__)
