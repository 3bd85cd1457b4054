"""Hugging Face transformers: attention traced through, its attention function kept whole.

In transformers 5.x every attention module picks its kernel at run time,

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, q, k, v, mask, dropout=..., ...)

and the kernel (``sdpa_attention_forward``, ``eager_attention_forward``, flash, flex) decides
``is_causal`` from shapes and the mask, and slices the mask to the key length. Traced through,
those decisions would be frozen to the example's. While fxsd traces, the interface hands out
kernels that become one ``call_function`` node each, so the decisions stay live, while the
attention module's own code (projections, rotary embeddings, cache updates, T5's position
bias) is traced like any other. The kernel called is the one configured when the model was
transformed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

from torch import fx, nn

from fxsd.graph_module import wrapped_call
from fxsd.tracing.calls import any_leaf

__all__ = ["is_hf_attention", "opaque_attention_kernels"]


def is_hf_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face attention module (its forward dispatches through
    ``ALL_ATTENTION_FUNCTIONS``)."""
    forward = getattr(type(module), "forward", None)
    code = getattr(inspect.unwrap(forward), "__code__", None) if forward else None
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


@contextlib.contextmanager
def opaque_attention_kernels(tracer: fx.Tracer) -> Iterator[None]:
    """While tracing with ``tracer``, make the kernels Hugging Face's attention interface hands
    out single graph calls. A no-op unless transformers is already imported."""
    utils = sys.modules.get("transformers.modeling_utils")
    interface = getattr(utils, "AttentionInterface", None)
    if interface is None:
        yield
        return
    original = interface.get_interface

    def get_interface(self: Any, implementation: str, default: Callable) -> Callable:
        return _opaque(original(self, implementation, default), tracer)

    interface.get_interface = get_interface
    try:
        yield
    finally:
        interface.get_interface = original


def _opaque(kernel: Callable, tracer: fx.Tracer) -> Callable:
    @functools.wraps(kernel)
    def call(*args: Any, **kwargs: Any) -> Any:
        if any_leaf((args, kwargs), fx.Proxy):
            return wrapped_call(tracer, kernel, args, kwargs)
        return kernel(*args, **kwargs)

    return call
