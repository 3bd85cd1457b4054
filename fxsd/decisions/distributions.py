"""Per-site drop rates: how a model-wide ``drop_rate`` is spread over depths ``1..L``.

* ``"linear"`` — the site at depth ``l`` of ``L`` gets ``drop_rate * l / L`` (Huang et al.'s rule,
  Composer's ``drop_distribution="linear"``): the last site drops at ``drop_rate``;
* ``"linspace"`` — ``drop_rate * (l - 1) / (L - 1)``: the first site never drops, the last drops at
  ``drop_rate`` (timm's ``linspace(0, rate, depth)``, torchvision's ConvNeXt/Swin rule);
* ``"uniform"`` — every site gets ``drop_rate`` (Hugging Face's ``config.layerdrop``, fairseq's
  LayerDrop);
* ``"exponential"`` — ``drop_rate * (exp((l - 1) * ln 2 / (L - 1)) - 1)``: rates rise
  exponentially with depth from 0 at the first site to ``drop_rate`` at the last (LayerSkip,
  Elhoushi et al. 2024, with ``drop_rate`` as their ``p_max`` and their ``l = 0 … L - 1``);
* a sequence — one rate per site, in execution order: a list or tuple, or a 1-D tensor or NumPy
  array (timm's ``torch.linspace(0, 0.2, depth)``);
* a callable ``(depth, L) -> rate`` — returns the rate for depth ``l`` of ``L``.

A sequence or callable gives every site its rate itself, so :func:`fxsd.stochastic_depth` refuses
a ``drop_rate`` beside it (``target_saving`` scales it); the model-wide rate
(:func:`fxsd.get_drop_rate`) is then the largest site rate, and :func:`fxsd.set_drop_rate`
scales every site by the same factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

from fxsd.arguments import check_rate
from fxsd.errors import InvalidArgumentError, InvalidTypeError

__all__ = ["Distribution", "DISTRIBUTIONS", "DEFAULT_DROP_RATE",
           "check_distribution", "site_rates"]

Distribution = Union[str, Sequence[float], Callable[[int, int], float], Any]
DISTRIBUTIONS = ("linear", "linspace", "uniform", "exponential")
#: The model-wide drop rate when none is given and the model has no drop paths of its own to
#: adopt: :func:`fxsd.stochastic_depth` and ``fxsd inspect`` alike (defined once, here).
DEFAULT_DROP_RATE = 0.1


def check_distribution(distribution: object, name: str = "distribution") -> Distribution:
    """``distribution`` checked before any work: a known name, a callable that takes
    ``(depth, L)``, or a 1-D sequence of rates in [0, 1] (its length is checked against the
    sites by :func:`site_rates`, once they are known)."""
    if isinstance(distribution, str):
        if distribution not in DISTRIBUTIONS:
            raise _unknown(distribution, name)
        return distribution
    if callable(distribution):
        from fxsd.arguments import (
            check_callable,  # imports torch: `fxsd --help` imports us
        )

        return check_callable(distribution, name, f"{name}(depth, L)", 2)
    rates = _as_rates(distribution, name)
    if rates is None:
        raise _wrong_type(distribution, name)
    for i, r in enumerate(rates):
        check_rate(r, f"{name}[{i}]")
    return distribution


def _unknown(distribution: str, name: str) -> InvalidArgumentError:
    from fxsd.arguments import close_matches  # imports torch: `fxsd --help` imports us

    return InvalidArgumentError(
        f"unknown {name} {distribution!r}: use one of {DISTRIBUTIONS}, a sequence of per-site "
        f"rates, or a callable (depth, L) -> rate{close_matches(distribution, DISTRIBUTIONS)}")


def _wrong_type(distribution: object, name: str) -> InvalidTypeError:
    return InvalidTypeError(
        f"{name} must be one of {DISTRIBUTIONS}, a 1-D sequence of per-site rates (list, "
        f"tuple, tensor, NumPy array) or a callable (depth, L) -> rate, got "
        f"{type(distribution).__name__}")


def site_rates(drop_rate: float, distribution: Distribution, depths: Sequence[int],
               num_levels: int) -> list[float]:
    """The drop rate of each site, given the sites' depths and the largest depth ``L``.

    Example:
        >>> site_rates(0.5, "linear", [1, 2, 3, 4], 4)
        [0.125, 0.25, 0.375, 0.5]
    """
    if isinstance(distribution, str):
        rate = check_rate(drop_rate)
        if distribution == "linear":
            return [rate * d / num_levels for d in depths]
        if distribution == "linspace":
            return [rate * (d - 1) / (num_levels - 1) if num_levels > 1 else 0.0 for d in depths]
        if distribution == "uniform":
            return [rate for _ in depths]
        if distribution == "exponential":
            if num_levels < 2:
                return [0.0 for _ in depths]
            return [rate * (math.exp((d - 1) * math.log(2) / (num_levels - 1)) - 1)
                    for d in depths]
        raise _unknown(distribution, "distribution")
    if callable(distribution):
        try:
            return [check_rate(distribution(d, num_levels), f"distribution({d}, {num_levels})")
                    for d in depths]
        except TypeError as exc:
            if isinstance(exc, InvalidTypeError):
                raise
            raise InvalidTypeError(
                f"a callable distribution is called as distribution(depth, L) and must return a "
                f"rate: {type(exc).__name__}: {exc}") from exc
    rates = _as_rates(distribution)
    if rates is None:
        raise _wrong_type(distribution, "distribution")
    if len(rates) != len(depths):
        raise InvalidArgumentError(
            f"distribution lists {len(rates)} rates but the model has {len(depths)} residual "
            "sites (list them with fxsd.find_residuals)"
        )
    return [check_rate(r, f"distribution[{i}]") for i, r in enumerate(rates)]


def _as_rates(distribution: Any, name: str = "distribution") -> list[Any] | None:
    """A 1-D sequence of rates as a list of Python numbers, or None."""
    if hasattr(distribution, "tolist") and hasattr(distribution, "ndim"):  # tensor, ndarray
        if distribution.ndim != 1:
            raise InvalidArgumentError(
                f"a {name} of per-site rates must be 1-D, got {distribution.ndim}-D")
        return list(distribution.tolist())
    if isinstance(distribution, Sequence):
        return list(distribution)
    return None
