"""What does an activation memory budget cost in step time?

One HF Llama (built from config, random init, fp32, SGD; the optimizer, data, loss and thread count are
identical in every run) is trained for a few steps without offload, then under each strategy at activation
budgets of 25/50/75% of the no-offload activation peak, all in one process, side by side:

- ``memtier``: the activation MIP (`planner.mip.activations.solve_activations`) fed with measured per-block
  costs (saved bytes and input bytes from `offload.activations.profile_blocks`, forward times from hooks,
  backward times scaled by the measured backward/forward ratio, the NVMe tier's effective write/read
  bandwidth on one block's saved tensors (`tier_bandwidth`; `--bandwidth disk`: `launch.measure.probe.measure_disk`'s
  sequential file I/O)), swapping to the NVMe tier and recomputing whole blocks (on a GPU machine the swap
  target would be host DRAM; this script runs the CPU case); its plan is checked with `offload.activations.predict_activation_peak_bytes` plus the forward-time
  peaks with the runtime's pinned swap sources (`pinned_peak_bytes`), and the MIP's budget tightened by any
  excess (up to 6 times); the plan's activation peak is then measured once and, while above the budget less
  half the margin, re-planned for the budget less the excess or less the measured-over-predicted gap,
  whichever is more (up to 4 times; `calibration` in the JSON); a
  budget no plan meets is reported with its floor (`floor_bytes`); then `offload.apply` carries it out;
- ``memtier_compile``: memtier on compiled blocks (`offload.apply(..., compile_blocks=CompileOptions(...))`,
  `offload.activations.compiled`): the same MIP, margin and checks, fed with costs measured under compile
  (the compiled blocks' saved tensors, forward times and no-offload step, `activations_compile.compiled_costs`)
  at each partitioner budget the ``compile_budget`` strategy uses, at 1.0, and at the budget whose measured
  no-offload peak lands on the planning line (interpolated between the measured budgets that bracket it:
  `refined_share`, since a share of the eager saved bytes lands well under it); the plan with the lowest
  predicted step wins, so the partitioner's cheap-op recompute inside each block and memtier's swap/recompute across
  blocks add up. Its gradients are compared with the compiled model's without memtier (`grad_check`:
  `torch.allclose` at atol = rtol = 1e-4, `torch._dynamo.utils.same`'s default);
- ``recompute_all``: every block under a non-reentrant `torch.utils.checkpoint` (budget-independent: measured
  once, and checked against every budget);
- ``sac_milp``: torch's selective-activation-checkpointing MILP (`torch.distributed._tools.sac_ilp.sac_milp`)
  over the blocks, fed with stats measured here on CPU (torch's own `SACEstimator` runs under FakeTensorMode
  and times ops on CUDA): per-op runtimes and output bytes of one block from a TorchDispatchMode, the block
  memory and live activation bytes from MemTracker; each block's discard ratio is turned into a per-op
  save/recompute list by torch's `get_optimal_checkpointing_policy_per_module` and carried out with
  `torch.utils.checkpoint.create_selective_checkpoint_contexts`;
- ``compile_budget``: every block under `torch.compile` with
  `torch._functorch.config.activation_memory_budget` (the min-cut partitioner's knob, a fraction of the
  compiled graph's saved activations), set to the share of the blocks' saved bytes the budget leaves;
  ``compile_nobudget`` (budget 1.0) is the compiled speed without a memory limit.

Definitions (also written to the JSON):
- activation peak: the largest number of bytes allocated during one training step (forward, loss, backward,
  optimizer step) above the bytes live when it starts (parameters, gradients, optimizer state, the batch),
  measured by the PyTorch profiler's allocator accounting (`profile_memory=True`, "Total Allocated" of the
  main thread's CPU allocations). Not MemTracker: a TorchDispatchMode makes torch.compile run eagerly, and
  the same instrument must measure every strategy. The no-offload peak is also measured with MemTracker
  (JSON: baseline.memtracker_act_peak_bytes) as a cross-check.
- budget: fraction x no-offload activation peak; a strategy fits when its measured activation peak <= budget.
- step-time ratio: median step time / median no-offload step time, measured right before it in the same
  run (each strategy's own no-offload steps, so that load drifting on a shared machine hits both sides).

The loss is the chunked linear cross-entropy (`offload.loss`, in every run, the baseline included) unless
``--loss standard``: full logits (and their fp32 copies and gradient) are a floor under every strategy's
peak that no block policy moves, which would hide the blocks' trade-off at the small budgets.

    .venv/bin/python benchmarks/activations.py --quick   # llama-20m, 1x256 tokens, aot_eager (~1-2 min)
    .venv/bin/python benchmarks/activations.py           # llama-20m, 2x256 tokens, inductor (~3-7 min)

Writes benchmarks/results/activations{_quick}.json and .png.

The parts: activations_trainer.py (config, model, baseline), activations_memtier.py, activations_torch.py
(sac_milp, compile), activations_run.py (the side-by-side run), activations_plot.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.activations_plot import plot  # noqa: E402
from benchmarks.activations_run import run  # noqa: E402
from benchmarks.activations_trainer import STRATEGIES, Config, progress  # noqa: E402
from launch.measure.record import write_json  # noqa: E402
from planner.presets import MODEL_PRESETS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COMPILE_BACKENDS = ("inductor", "aot_eager_decomp_partition")
LOSSES = ("chunked", "standard")
CHECKS = ("runtime", "offload")
BANDWIDTH_SOURCES = ("tier", "disk")


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), default="llama-20m")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--steps", type=int, default=None, help="timed steps per strategy")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loss", choices=LOSSES, default="chunked")
    p.add_argument("--loss-chunk", type=int, default=128, help="tokens per chunk of the chunked loss")
    p.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default=None)
    p.add_argument("--swap-dir", default=os.path.join(RESULTS, "tmp"), help="directory on the NVMe drive")
    p.add_argument("--disk-probe-mib", type=int, default=None)
    p.add_argument(
        "--bandwidth",
        choices=BANDWIDTH_SOURCES,
        default="tier",
        help="tier bandwidth the MIP plans with: the NVMe tier's own put/get of one block's saved tensors "
        "(per-tensor overheads included), or launch.measure.probe.measure_disk's sequential 1 MiB file I/O",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch intra-op threads (default: cores - 1, leaving one for the swap worker)",
    )
    p.add_argument(
        "--check",
        choices=CHECKS,
        default="runtime",
        help="how memtier's plan is checked against the budget before it runs (the MIP re-solved tighter "
        "while it exceeds): offload.activations.predict_activation_peak_bytes alone ('offload'), or also "
        "the forward/loss peaks with swap sources pinned until written ('runtime')",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="1x256 tokens (not 2x256), 3 timed steps, aot_eager compile"
    )
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/activations[_quick])")
    a = p.parse_args(argv)
    for f in a.budgets:
        if not 0.0 < f < 1.0:
            p.error(f"--budgets: every fraction must be in (0, 1), got {f}")
    quick = a.quick
    return Config(
        model=a.model,
        layers=a.layers or 0,
        batch=a.batch or (1 if quick else 2),
        seq_len=a.seq_len or 256,
        budgets=tuple(sorted(a.budgets)),
        strategies=tuple(a.strategies),
        steps=a.steps or (3 if quick else 5),
        warmup=max(1, a.warmup),
        loss=a.loss,
        loss_chunk=a.loss_chunk,
        compile_backend=a.compile_backend or ("aot_eager_decomp_partition" if quick else "inductor"),
        swap_dir=a.swap_dir,
        disk_probe_mib=a.disk_probe_mib or (16 if quick else 64),
        bandwidth=a.bandwidth,
        check=a.check,
        threads=a.threads,
        seed=a.seed,
        quick=quick,
        out=a.out or os.path.join(RESULTS, "activations_quick" if quick else "activations"),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    result = run(cfg)
    write_json(cfg.out + ".json", result)
    plot(result, cfg.out + ".png")
    progress(f"wrote {cfg.out}.json and .png in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
