"""Training integration: rate schedules, Lightning and Trainer callbacks, Composer's entry point,
torch.compile, eval scales folded into weights.

Modules are imported by their full path (``fxsd.runtime.accessors.<module>``); docs/design.md has
the map.
"""

from fxsd._lazy import submodules

__getattr__ = submodules(__name__)
