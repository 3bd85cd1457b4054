"""fxsd under ``torch.distributed``: ranks, and what sharding engines need from fxsd.

* :func:`rank` — this process's rank, for per-rank decision streams (``sync_ranks=False``).
* :func:`check_not_wrapped` — fxsd transforms the plain model; a model already wrapped by FSDP or
  DDP is refused with a message saying to transform first (tracing a sharded module would run
  FSDP's hooks on proxies, and the wrappers' own forwards are not the model's).
* :func:`check_unsynced_sharding` — with ``sync_ranks=False`` each rank skips other branches.
  Under FSDP2 the ranks' collectives then stop matching: a rank that skipped a branch sends no
  gradient for its parameters, and when a skipped block's output does not require grad (the
  first block, fed by the data) that rank does not even all-gather the block for backward, while
  the others do: a hang or a gloo abort. ``set_reduce_scatter_unused_params(True)`` fixes the
  first case, not the second. So fxsd refuses per-rank decisions under FSDP2: the gates call
  this before their first unsynced draw and raise a clear error instead.
"""

from __future__ import annotations

import os

from fxsd.arguments import wrapper_kind
from fxsd.errors import InvalidArgumentError

__all__ = ["rank", "check_unsynced_sharding"]

def rank() -> int:
    """The default process group's rank, else ``$RANK``, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def check_unsynced_sharding() -> None:
    """Raise when FSDP2 shards modules in this process and ranks would draw their own decisions.

    Only meaningful for ``sync_ranks=False`` with more than one rank. Reads torch's registry of
    composable distributed states (FSDP2 registers every module it shards there).

    Raises:
        InvalidArgumentError: the ranks' collectives would not match.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover - older torch: nothing to inspect
        return
    for module in list(_module_state_mapping):
        if wrapper_kind(module) == "FSDPModule":
            raise InvalidArgumentError(
                f"sync_ranks=False lets each rank skip other branches, but FSDP2 shards "
                f"{type(module).__name__}: the ranks' all-gathers and reduce-scatters would "
                "stop matching (a hang or an abort; set_reduce_scatter_unused_params does not "
                "cover a skipped block whose output needs no gradient). Transform with "
                "sync_ranks=True: the same decisions on every rank, and a skipped block's "
                "branch computes nothing on any rank")


def unsynced_sharding_generation() -> int:
    """A number that changes whenever modules are sharded or unsharded (cheap to read)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover
        return 0
    return len(_module_state_mapping)
