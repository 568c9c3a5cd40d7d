"""The `memtier` command: parse, build, call. No logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from planner.errors import InfeasibleError, SpecError

VERBS = ("probe", "estimate", "plan", "launch", "bench")
# torch.compile backends a plan may name (`memtier plan --compile`, `memtier probe --compile`)
COMPILE_BACKENDS = ("inductor", "aot_eager_decomp_partition", "aot_eager")


def _int_at_least(low: int, what: str) -> Any:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _add_specs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="preset name (e.g. llama3-8b), path to an HF config.json, or FILE.py:FUNCTION (or"
        " package.module:FUNCTION) returning a transformers causal LM, built on the meta device",
    )
    p.add_argument(
        "--cluster", default="local", help="preset name (e.g. dgx-a100-8x80g), cluster YAML, or 'local'"
    )
    p.add_argument("--nodes", type=_positive_int, help="resize a multi-node preset to this many nodes")


def _add_compile_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--compile", nargs="?", const="inductor", default="", choices=COMPILE_BACKENDS, help=help)


def _add_workload(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--global-batch", type=_positive_int, help="sequences per optimizer step (default: dp * micro-batch)"
    )
    p.add_argument("--micro-batch", type=_positive_int, help="sequences per rank per forward")
    p.add_argument(
        "--seq", type=_positive_int, default=None, help="sequence length (default 2048, capped by the model)"
    )
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument(
        "--optimizer", choices=["adamw", "sgd", "galore", "natural_galore", "frugal"], default="adamw"
    )
    p.add_argument("--rank", type=_positive_int, default=128, help="GaLore/FRUGAL projection rank")
    p.add_argument(
        "--precision",
        choices=["mixed", "pure", "any"],
        default="mixed",
        help="bf16/fp16: fp32 master + fp32 moments (mixed), or weights and moments in the 16-bit dtype (pure:"
        " 8 B/param less with AdamW, updates below a bf16 ulp are lost); any: plan searches both",
    )
    p.add_argument(
        "--layerwise",
        choices=["off", "on", "any"],
        default="off",
        help="step each parameter in backward and free its gradient (no global clipping); any: plan searches",
    )
    p.add_argument(
        "--state-bits",
        choices=["0", "8", "4", "any"],
        default="0",
        help="optimizer moments in 8 bits (bitsandbytes) or 4 bits (torchao); 0: unquantized; any: plan searches",
    )
    p.add_argument(
        "--no-flash", action="store_true", help="attention without a fused kernel (keeps the score matrix)"
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="LoRA adapters of this rank on --lora-targets; the base weights are frozen (0: full fine-tuning)",
    )
    p.add_argument(
        "--lora-targets",
        default="q_proj,v_proj",
        help="comma-separated module names that carry LoRA adapters (PEFT's target_modules)",
    )
    _add_compile_flag(
        p, "the blocks run under torch.compile with this backend (default inductor), costed with the factors "
        "`memtier probe --compile` measured"
    )  # fmt: skip
    p.add_argument(
        "--compile-memory-budget",
        type=float,
        default=None,
        help="with --compile: the min-cut partitioner's activation budget in each block (0-1). Unset: `memtier "
        "plan` picks among the budgets `memtier probe --compile` measured (torch's own where none were)",
    )


def _add_launch_parser(sub: Any) -> None:
    p = sub.add_parser("launch", help="run a training script under torchrun with a plan applied")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan", help="plan.json to apply")
    g.add_argument("--auto", action="store_true", help="plan for this machine first")
    p.add_argument("--nproc", type=_positive_int, default=1)
    p.add_argument("--nnodes", type=_positive_int, default=1)
    p.add_argument("--rdzv-endpoint", default=None)
    p.add_argument(
        "--engine",
        choices=["torch", "deepspeed", "accelerate"],
        default=None,
        help="default: the plan's layout.engine (torch without a plan); must agree with the plan",
    )
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        help="seconds without a rank's heartbeat before it is killed as hung (default 120; 0: off)",
    )
    p.add_argument(
        "--collective-timeout",
        type=float,
        default=None,
        help="seconds one collective may wait for its peers before the rank fails (default 600)",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this node's index in the plan's rank -> device map (default: $NODE_RANK or 0)",
    )
    p.add_argument("--model", default="llama-20m", help="--auto: model preset or HF config.json")
    p.add_argument("--seq", type=_positive_int, default=256, help="--auto: sequence length")
    p.add_argument("--micro-batch", type=_positive_int, default=4, help="--auto: sequences per rank")
    p.add_argument("--budget", help="--auto: memory per rank (e.g. 2GiB); default: the machine's share")
    p.add_argument("--plan-out", default=".memtier/auto", help="--auto: directory for the plan")
    p.add_argument(
        "--cluster", default="local", help="--auto: cluster YAML or 'local' (this machine's probe)"
    )
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)


def _add_links_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("links (--links: a torchrun job, one rank per device)")
    g.add_argument(
        "--links",
        action="store_true",
        help="measure every link of the job (pairs alone and in parallel rounds, all-reduce per group size)"
        " and write them as overrides into the cluster YAML --out (default cluster.yaml)",
    )
    g.add_argument("--nproc-per-node", type=_positive_int, default=1, help="ranks (devices) on this node")
    g.add_argument("--nnodes", type=_positive_int, default=1)
    g.add_argument("--node-rank", type=_non_negative_int, default=None, help="default: $NODE_RANK or 0")
    g.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of node 0 (needed with --nnodes > 1)")
    g.add_argument(
        "--cluster",
        default=None,
        help="base cluster (preset, YAML) for devices and tiers (default: --out or local)",
    )
    g.add_argument("--message-bytes", default="64MiB", help="bytes per timed message and all-reduce")
    g.add_argument("--reps", type=_positive_int, default=5, help="timed messages per pair and direction")
    g.add_argument("--tolerance", type=float, default=0.1, help="device-pair override past this share")
    g.add_argument("--plot", default=None, help="heatmap PNG (default: beside --out, .links.png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memtier",
        description="Plan and run training of models that do not fit in accelerator memory.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("probe", help="measure this machine and write a cluster YAML")
    p.add_argument("--out", help="write the ClusterSpec YAML here (default: print it)")
    p.add_argument("--disk", help="directory whose disk bandwidth to measure (default: the temp dir)")
    p.add_argument("--quick", action="store_true", help="smaller measurements (under a minute)")
    _add_compile_flag(
        p, "also measure what torch.compile with this backend (default inductor) changes in a block: saved "
        "bytes and time, at torch's own partitioner budget and at 1.0/0.8/0.6/0.4/0.2 (about 20 s: the block is "
        "compiled at each)"
    )  # fmt: skip
    _add_links_flags(p)

    p = sub.add_parser("estimate", help="memory and step-time breakdown of a model/workload/layout")
    _add_specs(p)
    _add_workload(p)
    for name in ("tp", "pp", "dp", "cp"):
        p.add_argument(f"--{name}", type=_positive_int, default=None)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--offload", choices=["none", "optimizer", "optimizer+params"], default="none")
    p.add_argument("--offload-tier", choices=["dram", "nvme", "cxl"], default="dram")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument(
        "--chunked-loss",
        type=_non_negative_int,
        default=0,
        metavar="TOKENS",
        help="chunked cross-entropy chunk size",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE.png", help="draw the memory breakdown as a stacked bar chart")
    p.add_argument(
        "--trace",
        action="store_true",
        help="also trace the model on the meta device: per-module parameters and saved-activation bytes",
    )

    p = sub.add_parser("plan", help="search layouts and solve placements: plan.json + emitted configs")
    _add_specs(p)
    _add_workload(p)
    p.add_argument("--budget", help="device memory budget per device (e.g. 8GiB); default: device memory")
    p.add_argument("--top", type=_positive_int, default=5)
    p.add_argument("--out", help="directory for plan.json, ds_config.json, accelerate.yaml, launch.sh")
    p.add_argument("--json", action="store_true")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds per solver")
    p.add_argument(
        "--interleave",
        type=_positive_int,
        nargs="+",
        default=[1],
        metavar="V",
        help="model chunks per device to try for the interleaved 1F1B schedule (e.g. 1 2 4; Megatron-LM runs "
        "it, DeepSpeed does not): default 1, plain 1F1B",
    )
    p.add_argument(
        "--vocab-parallel",
        action="store_true",
        help="cost the embeddings and the LM head split by vocabulary over tp (Megatron-LM's layers); memtier's "
        "trainer keeps them whole on every tp rank and refuses such a plan",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["torch", "deepspeed", "accelerate"], default="torch")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm clipping (0: off)")
    p.add_argument(
        "--data-parallel-only",
        action="store_true",
        help="search only the layouts memtier's trainer runs today (data parallel; ZeRO with --engine deepspeed)",
    )
    p.add_argument(
        "--no-checksum",
        action="store_true",
        help="no CRC32 on swap and state files (on by default: a flipped bit on disk is caught, not trained on)",
    )

    _add_launch_parser(sub)

    p = sub.add_parser("bench", help="MFU and memory side by side with baselines")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/bench")
    p.add_argument(
        "--calibrate", action="store_true", help="write measured efficiencies back to the cluster YAML"
    )
    p.add_argument("--cluster", default="local")
    from launch import bench

    bench.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args)
    except SpecError as e:
        if args.debug:
            traceback.print_exc()
        print(f"memtier {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except InfeasibleError as e:
        if args.debug:
            traceback.print_exc()
        print(f"memtier {args.verb}: infeasible: {e}", file=sys.stderr)
        for alt in e.alternatives:
            print(f"  - {alt}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"memtier {args.verb}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # a path the user gave that cannot be written or read (a directory, a file in the way, no space, no
        # permission): bad input, named; exit 2
        if args.debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"memtier {args.verb}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - an internal error: one line, never a bare traceback
        if args.debug:
            traceback.print_exc()
        print(
            f"memtier {args.verb}: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "probe" and args.links:
        from launch.measure import links

        return links.run_cli(args)
    if args.verb == "probe":
        from launch.measure import probe
        from planner.cluster import cluster_to_yaml
        from planner.schema import atomic_write_text

        result = probe.probe(disk=args.disk, quick=args.quick)
        if args.compile:
            from launch.measure.compile_probe import measure_compile

            result = dataclasses.replace(
                result, compile=measure_compile(args.compile, quick=args.quick, log=probe._log)
            )
        text = cluster_to_yaml(probe.to_cluster(result))
        if args.out:
            atomic_write_text(args.out, text)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    if args.verb == "estimate":
        from launch import estimate
        from planner.schema import check_output_file

        if args.plot:
            check_output_file(args.plot, "--plot")

        result = estimate.run(args)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(estimate.render(result))
        if args.plot:
            estimate.plot(result, args.plot)
        return 0
    if args.verb == "plan":
        from launch import plan

        result = plan.run(args)
        print(json.dumps(result, indent=2) if args.json else plan.render(result))
        return 0
    if args.verb == "launch":
        from launch import run

        return run.run_cli(args)
    if args.verb == "bench":
        from launch import bench

        return bench.run_cli(args)
    print(f"memtier {args.verb}: not implemented yet in this version of memtier", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
