"""fxsd under torch.distributed: DDP and per-block FSDP2 on two CPU processes (gloo), and
``torch.distributed.checkpoint`` of the sharded result."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fxsd

STEPS = 20


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def _worker(rank: int, world: int, init_file: str, sync: bool, find_unused: bool,
            out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    decisions: list = []
    error = None
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = nn.Sequential(*[Block() for _ in range(6)], nn.Linear(16, 1))
        gm = fxsd.stochastic_depth(model, 0.5, distribution="uniform", seed=7, sync_ranks=sync)
        ddp = DDP(gm, find_unused_parameters=find_unused)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)  # different data per rank
        try:
            for _ in range(STEPS):
                x = torch.randn(8, 16, generator=data)
                loss = ddp(x).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                decisions.append([bool(g.dropped) for g in fxsd.gates(gm)])
        except RuntimeError as exc:
            error = str(exc)
        flat = torch.cat([p.detach().flatten() for p in gm.parameters()]).tolist()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"decisions": decisions, "params": flat, "error": error}, f)
    finally:
        if error is None:
            dist.destroy_process_group()


def _launch(tmp_path, sync: bool, find_unused: bool = True, world: int = 2) -> list[dict]:
    init_file = tmp_path / "init"
    out = tmp_path / "out.json"
    mp.spawn(_worker, args=(world, str(init_file), sync, find_unused, str(out)), nprocs=world,
             join=True)
    return [json.loads((tmp_path / f"out.json.{r}").read_text()) for r in range(world)]


pytestmark = pytest.mark.skipif(not dist.is_available() or os.name == "nt",
                                reason="needs torch.distributed with gloo")


@pytest.mark.slow
def test_ddp_sync_ranks_same_decisions_identical_params(tmp_path):
    r0, r1 = _launch(tmp_path, sync=True)
    assert r0["error"] is None and r1["error"] is None
    assert len(r0["decisions"]) == STEPS
    assert r0["decisions"] == r1["decisions"]
    flat = [d for step in r0["decisions"] for d in step]
    assert 0 < sum(flat) < len(flat), "rate 0.5 should drop some branches and keep others"
    assert r0["params"] == r1["params"], "DDP must keep parameters identical across ranks"


@pytest.mark.slow
def test_ddp_per_rank_streams_differ_and_train(tmp_path):
    r0, r1 = _launch(tmp_path, sync=False)
    assert r0["error"] is None and r1["error"] is None
    assert len(r0["decisions"]) == len(r1["decisions"]) == STEPS
    assert r0["decisions"] != r1["decisions"]
    torch.testing.assert_close(torch.tensor(r0["params"]), torch.tensor(r1["params"]))


@pytest.mark.slow
def test_ddp_without_find_unused_parameters_fails_as_documented(tmp_path):
    # One process is enough: DDP's reducer raises on the step after a branch was dropped. (With
    # several, the failed collective leaves gloo unable to shut down cleanly.)
    (r0,) = _launch(tmp_path, sync=True, find_unused=False, world=1)
    assert r0["error"] is not None
    assert "find_unused_parameters=True" in r0["error"]
    assert "Expected to have finished reduction in the prior iteration" in r0["error"]
    assert len(r0["decisions"]) < STEPS


# -- FSDP2 -------------------------------------------------------------------------------------

FSDP_STEPS = 4


def _fsdp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(6)], nn.Linear(16, 1))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 * rank + step))


def _fsdp_worker(rank: int, world: int, init_file: str, scenario: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    result: dict = {"error": None, "decisions": [], "fc_calls": []}
    try:
        # Sharding first and transforming after is refused with a clear message.
        sharded_first = _fsdp_model()
        fully_shard(sharded_first[0], mesh=mesh)
        try:
            fxsd.stochastic_depth(sharded_first, 0.5)
        except fxsd.FxsdError as exc:
            result["shard_first"] = str(exc)
        del sharded_first
        gc.collect()
        model = fxsd.stochastic_depth(_fsdp_model(), 0.5, distribution="uniform", seed=7,
                                      sync_ranks=scenario == "sync")
        blocks = [m for m in model if isinstance(m, Block)]  # gated blocks: still Blocks
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if scenario == "unsynced":
            model.set_reduce_scatter_unused_params(True)  # not enough: refused all the same
        calls = [0] * len(blocks)
        for i, block in enumerate(blocks):
            block.fc.register_forward_hook(
                lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(FSDP_STEPS):
            calls[:] = [0] * len(blocks)
            model(_batch(rank, step)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            result["decisions"].append([bool(g.dropped) for g in fxsd.gates(model)])
            result["fc_calls"].append(list(calls))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        result["state"] = {k: v.tolist() for k, v in full.items()}
        if scenario == "sync":
            import torch.distributed.checkpoint as dcp

            dcp.save(get_model_state_dict(model), checkpoint_id=out + ".dcp")
    except fxsd.FxsdError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _launch_fsdp(tmp_path, scenario: str) -> list[dict]:
    out = str(tmp_path / "fsdp")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), scenario, out), nprocs=2, join=True)
    return [json.loads((tmp_path / f"fsdp.{r}").read_text()) for r in range(2)]


def _reference(decisions: list[list[bool]]) -> dict[str, torch.Tensor]:
    """One process, the two ranks' batches together, the same decisions: what FSDP2 (which
    averages gradients over ranks) must reproduce."""
    model = fxsd.stochastic_depth(_fsdp_model(), 0.5, distribution="uniform", seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(FSDP_STEPS):
        model(torch.cat([_batch(0, step), _batch(1, step)])).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        assert [bool(g.dropped) for g in fxsd.gates(model)] == decisions[step]
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load, one process
def test_fsdp2_per_block_matches_single_process_and_checkpoints(tmp_path):
    r0, r1 = _launch_fsdp(tmp_path, "sync")
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert "fully_shard" in r0["shard_first"] and "first" in r0["shard_first"]
    assert r0["decisions"] == r1["decisions"]
    flat = [d for step in r0["decisions"] for d in step]
    assert 0 < sum(flat) < len(flat)
    # a dropped block's branch computes nothing
    for decisions, calls in zip(r0["decisions"], r0["fc_calls"]):
        assert calls == [0 if d else 1 for d in decisions]
    # same keys as the untransformed model, same values on both ranks and as the reference
    assert list(r0["state"]) == list(_fsdp_model().state_dict())
    assert r0["state"] == r1["state"]
    reference = _reference(r0["decisions"])
    for k, v in r0["state"].items():
        torch.testing.assert_close(torch.tensor(v), reference[k], rtol=1e-5, atol=1e-6, msg=k)
    # the sharded checkpoint loads into the plain, untransformed model
    import torch.distributed.checkpoint as dcp

    plain = _fsdp_model()
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "fsdp.dcp"))
    plain.load_state_dict(state)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_fsdp2_unsynced_ranks_refused_before_the_first_step(tmp_path):
    r0, r1 = _launch_fsdp(tmp_path, "unsynced")
    for r in (r0, r1):
        assert r["error"] is not None and "sync_ranks=True" in r["error"], r["error"]
        assert r["decisions"] == []
