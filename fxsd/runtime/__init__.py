"""Step 5, run: the gate that draws and runs or skips a branch, the join it computes, decisions
replayed under checkpointing, a block traced again for a call its guards refuse.

Modules are imported by their full path (``fxsd.runtime.<module>``); docs/design.md has the map.
"""

from fxsd._lazy import submodules

__getattr__ = submodules(__name__)
