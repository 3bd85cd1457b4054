"""fxsd's graph passes, one per module.

* :mod:`fxsd.passes.stochastic_depth` — gate every residual branch (the main pass).
* :mod:`fxsd.passes.extract_module` — cut one module's ``forward`` out of the whole-model graph.
* :mod:`fxsd.passes.gate_site` — gate one site inside a cut-out module (its branch into a
  ``GraphModule``, a gate call in place of the add).
* :mod:`fxsd.passes.regate` — a gated block's new trace (a call its guards refuse) gated with
  the block's own gates.
* :mod:`fxsd.passes.partial_join` — a join into part of a tensor (``cat([y[:, :C] + s,
  y[:, C:]])``) as one ``partial_add`` node.
* :mod:`fxsd.passes.live_drop_path` — keep ``torchvision.ops.stochastic_depth`` calls aware of
  ``train()``/``eval()``.
* :mod:`fxsd.passes.explicit_inplace` — give in-place ops explicit results in the data flow.
* :mod:`fxsd.passes.strip_gates` — gates replaced by their eval semantics (``fxsd.strip``).
* :mod:`fxsd.passes.mask_drop_path` — the benchmark's comparison point: a mask drop path
  (torchvision ``StochasticDepth``) on every branch.
"""
