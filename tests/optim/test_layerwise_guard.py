"""LayerwiseStepper refuses a model that DDP or FSDP2 reduces: their reductions run after its per-parameter
steps, so every rank would silently update with its own local gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from optim import LayerwiseStepper
from optim.errors import OptimizerConfigError
from optim.per_param import PerParameterOptimizer


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo process group in this process, destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def test_ddp_wrapped_model_is_refused(one_rank_group):
    ddp = nn.parallel.DistributedDataParallel(_model())
    opt = PerParameterOptimizer.like(torch.optim.AdamW(ddp.parameters(), lr=1e-3))
    with pytest.raises(OptimizerConfigError, match="DistributedDataParallel") as e:
        LayerwiseStepper(opt, model=ddp)
    assert e.value.field == "model" and "unwrapped" in str(e.value)
    # a DDP module held inside another module is found too
    outer = nn.ModuleDict({"inner": ddp})
    with pytest.raises(OptimizerConfigError, match="at 'inner'"):
        LayerwiseStepper(opt, model=outer)
    # the refusal installs no hook: a backward through the DDP model leaves the gradients in place
    ddp(torch.randn(2, 8)).sum().backward()
    assert all(p.grad is not None for p in ddp.parameters())


def test_fsdp2_sharded_model_is_refused(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = PerParameterOptimizer.like(torch.optim.AdamW(model.parameters(), lr=1e-3))
    with pytest.raises(OptimizerConfigError, match="FSDP"):
        LayerwiseStepper(opt, model=model)


def test_plain_model_is_accepted_and_steps():
    model = _model()
    opt = PerParameterOptimizer.like(torch.optim.AdamW(model.parameters(), lr=1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    with LayerwiseStepper(opt, model=model):
        model(torch.randn(2, 8)).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # stepped and freed in backward
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
