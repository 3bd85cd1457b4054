"""Step 1, trace: fx tracing with drop paths kept live, both training modes, random draws watched,
module calls recorded; tracing one module along the call it received in an example run.

Modules are imported by their full path (``fxsd.tracing.tracer.<module>``); docs/design.md has the
map.
"""

from fxsd._lazy import submodules

__getattr__ = submodules(__name__)
