"""Step 2, analyse: which adds are residual joins (sites), their branches, what escapes them, their
costs. Pure: the model is never changed.

Modules are imported by their full path (``fxsd.analysis.analyze.<module>``); docs/design.md has the
map.
"""

from fxsd._lazy import submodules

__getattr__ = submodules(__name__)
