"""Train a small Llama on the text that ships with memtier, with a memtier plan applied.

This is the script to copy for your own model: it supplies the model, the optimizer and the data; the
trainer (`launch.train`) does the rest, and every decision it makes comes from the plan. Under
`memtier launch` the plan arrives in $MEMTIER_PLAN: model, sequence length, micro-batch, accumulation,
optimizer, clipping and engine are read from it, and `offload.apply(model, optimizer, plan)` carries out
its activation swap/recompute, chunked loss and optimizer-state offload. Without a plan the `--model`
preset trains plainly.

The model is a Hugging Face `LlamaForCausalLM` built from the spec (random init, nothing downloaded); the
tokenizer is byte-level (token = byte value); the data is `examples/data/corpus.txt` read as consecutive
windows, so the data position is one integer and a resume continues bit-identically.

    python examples/train_lm.py --model tiny-llama --steps 20
    memtier launch --nproc 2 --plan out/plan.json examples/train_lm.py --steps 50 --ckpt-dir ckpt
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:  # run as a plain script from a source checkout
    sys.path.insert(0, os.path.dirname(_HERE))

from launch.train import Settings, TrainConfigError, build_parser, entry, run  # noqa: E402
from planner.model import ModelSpec  # noqa: E402

DEFAULT_DATA = os.path.join(_HERE, "data", "corpus.txt")


def build_model(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """An HF Llama with exactly `spec`'s shapes, randomly initialised (the same on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.family not in ("llama", "mistral", "qwen2"):
        raise TrainConfigError(
            f"this example builds Llama-style models; got {spec.family!r}", field="model.family"
        )
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tied_embeddings, attention_bias=spec.qkv_bias, mlp_bias=spec.mlp_bias, use_cache=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"  # the fused kernel the planner's memory model assumes (flash)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    if n != spec.params:
        raise TrainConfigError(f"built {n} parameters, the spec says {spec.params}", field="model")
    return model


def build_optimizer(model: torch.nn.Module, settings: Settings, lr: float) -> Any:
    kind, opts = settings.optimizer, settings.optimizer_settings
    if kind == "adamw":
        # torch's fused kernel: its fastest AdamW on CPU and GPU, and the one memtier's offloaded optimizer uses
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    from optim import FRUGAL, GaLoreAdamW, low_rank_param_groups

    gap = int(opts.get("update_proj_gap", 200))
    if kind == "galore":
        groups = low_rank_param_groups(model, switch_key="galore", rank=int(opts.get("rank", 64)))
        return GaLoreAdamW(groups, lr=lr, update_proj_gap=gap)
    groups = low_rank_param_groups(model, switch_key="frugal", density=float(opts.get("density", 0.25)))
    return FRUGAL(groups, lr=lr, update_proj_gap=gap)


class ByteCorpus:
    """Byte-level tokens of a text file, cut into consecutive windows: sequence i (counted over all ranks
    since the start) is the window at byte `(i * seq_len) mod (len - seq_len)`."""

    def __init__(self, path: str, *, seq_len: int, vocab_size: int) -> None:
        if not os.path.isfile(path):
            raise TrainConfigError("file not found", field="--data", source=path)
        with open(path, "rb") as fh:
            raw = fh.read()
        if len(raw) < seq_len + 2:
            raise TrainConfigError(
                f"needs more than {seq_len + 1} bytes, has {len(raw)}", field="--data", source=path
            )
        if vocab_size < 256:
            raise TrainConfigError(
                f"byte tokens need vocab_size >= 256, got {vocab_size}", field="model.vocab_size"
            )
        self.tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        self.seq_len, self.span = seq_len, len(raw) - seq_len

    def batch(self, first_sequence: int, count: int) -> torch.Tensor:
        starts = [((first_sequence + j) * self.seq_len) % self.span for j in range(count)]
        return torch.stack([self.tokens[s : s + self.seq_len] for s in starts])


def main(argv: list[str] | None = None, *, on_step: Any = None) -> int:
    parser = build_parser("Train a small Llama with a memtier plan applied.")
    parser.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8/ASCII text file")
    args = parser.parse_args(argv)

    def make_data(s: Settings) -> ByteCorpus:
        return ByteCorpus(args.data, seq_len=s.seq_len, vocab_size=s.spec.vocab_size)

    return run(
        args, build_model=build_model, build_optimizer=build_optimizer, make_data=make_data, on_step=on_step
    )


if __name__ == "__main__":
    sys.exit(entry(main, "train_lm"))
