"""fxsd's graph passes, one per module.

* :mod:`fxsd.passes.stochastic_depth` — gate every residual branch (the main pass).
* :mod:`fxsd.passes.extract_module` — cut one module's ``forward`` out of the whole-model graph.
* :mod:`fxsd.passes.live_drop_path` — keep ``torchvision.ops.stochastic_depth`` calls aware of
  ``train()``/``eval()``.
* :mod:`fxsd.passes.explicit_inplace` — give in-place ops explicit results in the data flow.
* :mod:`fxsd.passes.strip_gates` — gates replaced by their eval semantics (``fxsd.strip``).
* :mod:`fxsd.passes.mask_drop_path` — the benchmark's comparison point: a mask drop path
  (torchvision ``StochasticDepth``) on every branch.
"""
