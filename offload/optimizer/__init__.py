"""Interleaved optimizer-state offload: AdamW whose state lives in tiers, updated on the CPU and the device.

After Deep Optimizer States (Maurya et al. 2024, "Towards Scalable Training of Transformer Models Using
Interleaved Offloading") on top of ZeRO-Offload (Ren et al. 2021) and ZeRO-Infinity (Rajbhandari et al. 2021):

- The parameters are partitioned into **subgroups** of whole tensors, at most ``subgroup_size`` elements each
  (DeepSpeed ZeRO-3's ``sub_group_size`` semantics: tensors are never split; 0: one subgroup per tensor).
  Each subgroup's fp32 master weights and the two Adam moments (``[3, n]`` fp32, 12 bytes per element) live in
  a tier -- host DRAM, CXL memory or NVMe files (``offload.tiers``), or the device ("device": not offloaded) --
  as the plan says, tier per subgroup. When the parameters are fp32 and the CPU can update them where they
  are (the device is the CPU, or the state is device-resident), they *are* the master weights and the tier
  keeps only the moments (``[2, n]``, 8 bytes per element): the same bits, without a master copy to write back.
  (``layout``)
- A CPU update of a subgroup starts as soon as its gradients are complete: a post-accumulate-grad hook on each
  parameter counts the micro-batches, and on the last one of an accumulation the subgroup is handed to the CPU
  lane (a worker thread), overlapping the rest of backward (``iteration``, ``lanes``). NVMe-resident state is
  prefetched ahead of its turn (``prefetch_depth`` subgroups, in the expected order) and written back behind it
  (a writer thread). Memory tiers (host, CXL) are updated in place: the kernel's operands are views of the arena
  (``ArenaStore.view``), with no staging copy in or out; on a CPU device the gradients are read in place too
  (``residency``). Updates left for ``step()`` (all of them with clipping) run on the thread that called it,
  which would otherwise only wait for the CPU lane.
- Each iteration a scheduler (``schedule``: the model; ``scheduler``: the decision at run time), driven by the
  measured throughputs (``records``) and the free device memory of that phase, decides which subgroups update
  on the device instead: their state is copied in, updated by the device kernel and copied back (the device
  lane, another worker thread). On a CPU-only machine the "device" is the CPU; the code paths are the same
  (device buffers are CPU tensors), and the schedule still runs and is logged (``schedule_log``).
- The CPU kernel is the faster, measured here, of torch's fused AdamW and DeepSpeed's CPU Adam (``kernels``).
  With torch's, the parameters are bit-identical to ``torch.optim.AdamW(fused=True)``
  (+ ``torch.nn.utils.clip_grad_norm_``) without offload: the kernel is called per parameter tensor, as that
  optimizer does, and the norm is computed the way clip_grad_norm_ does (``clipping``).
- The update is memory-bound (it streams parameters, gradients and both moments once per step), so the
  memory it streams sits in transparent huge pages where it can: the host tier's arena, and on a CPU device
  the fp32 parameters themselves (moved once, at construction; ``huge_page_params``, ``params``). And the path
  around the kernel is kept short: right after a sweep through memory every line of Python runs from cold
  caches, so a forced schedule is decided once and its iterations are logged in batches (``schedule_log`` is
  always complete when read).

Gradient clipping needs the global norm *before* any update. The choice made here (correctness first): with
``max_grad_norm`` set, the hooks only compute the gradient norms of each subgroup as it completes (one
``_foreach_norm`` per subgroup, overlapping backward) and every update is deferred to ``step()``, where the
global norm is known; without clipping, updates start in backward.

The optimizer (``adamw.OffloadedAdamW``) is a ``torch.optim.Optimizer``: ``param_groups`` drive the update
(learning rate read when a subgroup is dispatched), so ``torch.optim.lr_scheduler`` works;
``state_dict()``/``load_state_dict()`` use torch's per-parameter AdamW format (a torch AdamW state dict loads
here and vice versa, plus ``"master"`` for non-fp32 parameters); ``save_checkpoint()``/``load_checkpoint()``
stream the state subgroup by subgroup to one file with write-then-rename (``checkpoint``, the file format
``offload.optimizer_checkpoint``). ``from_plan.offload_optimizer`` carries out a Plan's placement.

CUDA: the device lane runs on its own stream, the CPU lane's copies on another; every hand-off between the
backward stream, the lanes and the host is ordered by an event, commented where it happens. On CPU those are
no-ops and the same code runs.

Modules, each importing only those listed before it: ``settings``, ``kernels``, ``schedule``, ``records``,
``layout``, ``params``, ``buffers``, ``iteration``, ``clipping``, ``residency``, ``scheduler``, ``lanes``,
``checkpoint``, ``adamw``, ``from_plan``.
"""

from offload.optimizer.adamw import OffloadedAdamW
from offload.optimizer.from_plan import offload_optimizer
from offload.optimizer.layout import SubgroupLayout, partition_subgroups
from offload.optimizer.schedule import initial_throughputs
from offload.optimizer.settings import OffloadSettings, OptimizerOffloadError

__all__ = [
    "OffloadSettings",
    "OffloadedAdamW",
    "OptimizerOffloadError",
    "SubgroupLayout",
    "initial_throughputs",
    "offload_optimizer",
    "partition_subgroups",
]
