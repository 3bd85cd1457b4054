"""fxsd's graph passes, one per module.

The rewrite of the user's modules (step 4 of docs/design.md's pipeline); the passes that make a
fresh trace canonical run in the tracer (:mod:`fxsd.tracing`).

* :mod:`fxsd.passes.gate_residuals` — gate every residual branch (the main pass).
* :mod:`fxsd.passes.extract_module` — cut one module's ``forward`` out of the whole-model graph.
* :mod:`fxsd.passes.gate_site` — gate one site inside a cut-out module (its branch into a
  ``GraphModule``, a gate call in place of the add).
* :mod:`fxsd.passes.regate` — a gated block's new trace (a call its guards refuse) gated with
  the block's own gates.
* :mod:`fxsd.passes.strip_gates` — gates replaced by their eval semantics (``fxsd.strip``).
* :mod:`fxsd.passes.prune_branches` — chosen branches removed from a stripped model
(``fxsd.prune``).
* :mod:`fxsd.passes.mask_drop_path` — the benchmark's comparison point: a mask drop path
  (torchvision ``StochasticDepth``) on every branch.
"""
