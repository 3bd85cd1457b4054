"""fxsd's graph passes, one per module.

* :mod:`fxsd.passes.stochastic_depth` — gate every residual branch (the main pass).
* :mod:`fxsd.passes.live_drop_path` — keep ``torchvision.ops.stochastic_depth`` calls aware of
  ``train()``/``eval()``.
* :mod:`fxsd.passes.explicit_inplace` — give in-place ops explicit results in the data flow.
"""
