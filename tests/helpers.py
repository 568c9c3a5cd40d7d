"""Shared test helpers: real HF models built from ModelSpecs (random init, no downloads)."""

from __future__ import annotations

import torch
import transformers

from planner.model import ModelSpec, to_hf_config_dict


def hf_model(spec: ModelSpec, *, seed: int = 0, attn: str | None = None, dropout: float = 0.0):
    d = to_hf_config_dict(spec, dropout=dropout)
    model_type = d.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **d)
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def mem_tracker():
    """torch's MemTracker, also for models with frozen parameters (LoRA): the trainer's (launch.train.metrics)."""
    from launch.train.metrics import mem_tracker as tracker

    return tracker()


def measure_step_peak(model, optimizer, ids, *, steps: int = 1) -> dict[str, int]:
    """Peak live bytes of a training step (forward, backward, optimizer step), by category.

    The first step runs untracked so the optimizer state exists, as in steady state.
    """

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = mem_tracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(steps):
            step()
    snap = tracker.get_tracker_snapshot("peak")
    per_dev = next(iter(snap.values()))
    return {str(k).split(".")[-1]: int(v) for k, v in per_dev.items()}


def vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    inside = False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


# Each supported family (planner.model.SUPPORTED_MODEL_TYPES) at its transformers config class's defaults —
# dropout, activation, attention kernel, routing — scaled down to 2 blocks, hidden 128 and a 2048-token
# vocabulary so a CPU step takes well under a second (GPT-2 keeps its 0.1 embedding, attention and residual
# dropout; the others default to none).
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # inside the small vocabulary
_SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 2048, **_IDS}
_GQA = {"hidden_size": 128, "intermediate_size": 352, "num_key_value_heads": 2, **_SMALL}
_MOE = {"hidden_size": 128, "intermediate_size": 352, "moe_intermediate_size": 64, "num_experts": 8,
        "num_experts_per_tok": 2, "num_key_value_heads": 2, **_SMALL}  # fmt: skip
DEFAULT_FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_GQA),
    "mistral": lambda: transformers.MistralConfig(**_GQA),
    "qwen2": lambda: transformers.Qwen2Config(**_GQA),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=32, **_GQA),
    "phi3": lambda: transformers.Phi3Config(**_GQA),
    "gemma2": lambda: transformers.Gemma2Config(head_dim=32, **_GQA),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(head_dim=32, **_GQA),
    "olmo2": lambda: transformers.Olmo2Config(**_GQA),
    "falcon": lambda: transformers.FalconConfig(hidden_size=128, **_SMALL),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=128, n_layer=2, n_head=4, vocab_size=2048, bos_token_id=1, eos_token_id=2
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=128, intermediate_size=512, **_SMALL),
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, **{**_GQA, "intermediate_size": 176}),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(shared_expert_intermediate_size=256, **_MOE),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_MOE),
}


def default_family_model(family: str, *, seed: int = 0):
    """(config, model in train mode) of `DEFAULT_FAMILY_CONFIGS[family]`, random init."""
    config = DEFAULT_FAMILY_CONFIGS[family]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    return config, model


def full_recompute(model: torch.nn.Module) -> None:
    """HF's whole-block activation checkpointing, non-reentrant: `activation_checkpointing_enable` where this
    transformers has it (it deprecates `gradient_checkpointing_enable`, to be removed in v6), else the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
