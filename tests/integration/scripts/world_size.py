"""Run by `accelerate launch --config_file <emitted accelerate.yaml>`: every rank joins one process group."""

import torch
import torch.distributed as dist
from accelerate import PartialState

# as memtier's trainer does on CPU (launch/train/engines.py: Accelerator(cpu=...)); initialises torch.distributed
# from the launcher's environment
state = PartialState(cpu=True)
assert dist.is_initialized(), "no process group"
world = dist.get_world_size()
assert world == 2, f"world size {world} != 2"
ones = torch.ones(1)
dist.all_reduce(ones)  # one collective across the group: two ranks sum to 2
assert ones.item() == 2.0, ones
print(
    f"rank {dist.get_rank()} of world_size {world} ({state.distributed_type.value}, {state.backend})",
    flush=True,
)
dist.destroy_process_group()
