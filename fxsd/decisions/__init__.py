"""Step 3, decide: the user's options checked, the rate of each site, the module that owns each
join, the budget.

Modules are imported by their full path (``fxsd.decisions.<module>``); docs/design.md has the map.
"""

from fxsd._lazy import submodules

__getattr__ = submodules(__name__)
