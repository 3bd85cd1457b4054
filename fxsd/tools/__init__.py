"""Tools around the pipeline: the command line, tables, the code listing, the benchmark, the demo.

Modules are imported by their full path (``fxsd.tools.<module>``); docs/design.md has the map.
"""

from fxsd._lazy import submodules

__getattr__ = submodules(__name__)
