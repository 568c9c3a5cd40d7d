"""Built-in models and clusters, by name.

Model numbers are from the published configs (HF hub config.json of each model;
GPT-3 from Brown et al. 2020 Table 2.1; the 1T GPT from Narayanan et al. 2021
Table 1). Device peaks are vendor datasheet dense figures.
"""

from __future__ import annotations

import os
from typing import Any

from planner.errors import SpecError, closest_names
from planner.model import ModelSpec

_LLAMA: dict[str, Any] = {"family": "llama", "position": "rope", "gated_mlp": True, "norm": "rmsnorm"}
_GPT: dict[str, Any] = {
    "family": "gpt",
    "position": "learned",
    "gated_mlp": False,
    "activation": "gelu",
    "norm": "layernorm",
    "tied_embeddings": True,
    "qkv_bias": True,
    "attn_out_bias": True,
    "mlp_bias": True,
}


def _m(name: str, base: dict[str, Any], **kw: Any) -> ModelSpec:
    return ModelSpec(name=name, **{**base, **kw})


MODEL_PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _m("gpt2", {**_GPT, "family": "gpt2", "activation": "gelu_new"}, num_layers=12, hidden_size=768,
           num_heads=12, ffn_hidden_size=3072, vocab_size=50257, max_position_embeddings=1024),
        _m("gpt2-xl", {**_GPT, "family": "gpt2", "activation": "gelu_new"}, num_layers=48, hidden_size=1600,
           num_heads=25, ffn_hidden_size=6400, vocab_size=50257, max_position_embeddings=1024),
        _m("llama2-7b", _LLAMA, num_layers=32, hidden_size=4096, num_heads=32, ffn_hidden_size=11008,
           vocab_size=32000, max_position_embeddings=4096),
        _m("llama2-13b", _LLAMA, num_layers=40, hidden_size=5120, num_heads=40, ffn_hidden_size=13824,
           vocab_size=32000, max_position_embeddings=4096),
        _m("llama2-70b", _LLAMA, num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
           ffn_hidden_size=28672, vocab_size=32000, max_position_embeddings=4096),
        _m("llama3-8b", _LLAMA, num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
           ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=8192),
        _m("llama3-70b", _LLAMA, num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
           ffn_hidden_size=28672, vocab_size=128256, max_position_embeddings=8192),
        _m("mistral-7b", {**_LLAMA, "family": "mistral"}, num_layers=32, hidden_size=4096, num_heads=32,
           num_kv_heads=8, ffn_hidden_size=14336, vocab_size=32000, max_position_embeddings=32768),
        _m("gpt3-175b", _GPT, num_layers=96, hidden_size=12288, num_heads=96, ffn_hidden_size=4 * 12288,
           vocab_size=50257, max_position_embeddings=2048),
        # Narayanan et al. 2021 (Megatron-LM at scale), Table 1, last row: 1008B parameters
        _m("megatron-1t", _GPT, num_layers=128, hidden_size=25600, num_heads=160, ffn_hidden_size=4 * 25600,
           vocab_size=51200, max_position_embeddings=2048),
        # families beyond Llama/GPT (HF hub config.json of each; counts checked in tests/planner/test_families.py)
        _m("phi3-mini", {**_LLAMA, "family": "phi3", "fused_qkv": True}, num_layers=32, hidden_size=3072,
           num_heads=32, ffn_hidden_size=8192, vocab_size=32064, max_position_embeddings=4096),
        _m("qwen3-8b", {**_LLAMA, "family": "qwen3", "qk_norm": "head"}, num_layers=36, hidden_size=4096,
           num_heads=32, num_kv_heads=8, head_dim=128, ffn_hidden_size=12288, vocab_size=151936,
           max_position_embeddings=40960),
        _m("gemma2-9b", {**_LLAMA, "family": "gemma2", "activation": "gelu_pytorch_tanh", "norms_per_block": 4,
           "tied_embeddings": True}, num_layers=42, hidden_size=3584, num_heads=16, num_kv_heads=8,
           head_dim=256, ffn_hidden_size=14336, vocab_size=256000, max_position_embeddings=8192,
           sliding_window=4096, sliding_layers=21, attn_logit_softcap=50.0, final_logit_softcap=30.0),
        # mixtures of experts: ffn_hidden_size is one expert's
        _m("mixtral-8x7b", {**_LLAMA, "family": "mixtral"}, num_layers=32, hidden_size=4096, num_heads=32,
           num_kv_heads=8, ffn_hidden_size=14336, vocab_size=32000, max_position_embeddings=32768,
           num_experts=8, experts_per_token=2),
        _m("qwen3-30b-a3b", {**_LLAMA, "family": "qwen3_moe", "qk_norm": "head"}, num_layers=48, hidden_size=2048,
           num_heads=32, num_kv_heads=4, head_dim=128, ffn_hidden_size=768, vocab_size=151936,
           max_position_embeddings=40960, num_experts=128, experts_per_token=8),
        # small models sized for a CPU (tests, benchmarks, the demo)
        _m("tiny-llama", _LLAMA, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
           ffn_hidden_size=176, vocab_size=512, max_position_embeddings=256),
        _m("tiny-gpt2", {**_GPT, "family": "gpt2", "activation": "gelu_new"}, num_layers=2, hidden_size=64,
           num_heads=4, ffn_hidden_size=256, vocab_size=512, max_position_embeddings=256),
        _m("llama-20m", _LLAMA, num_layers=8, hidden_size=384, num_heads=6, ffn_hidden_size=1024,
           vocab_size=8192, max_position_embeddings=1024),
        _m("llama-34m", _LLAMA, num_layers=8, hidden_size=512, num_heads=8, ffn_hidden_size=1376,
           vocab_size=8192, max_position_embeddings=1024),
        _m("llama-300m", _LLAMA, num_layers=16, hidden_size=1024, num_heads=16, ffn_hidden_size=4096,
           vocab_size=32000, max_position_embeddings=2048),
    ]
}  # fmt: skip


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset by name, or an HF config.json (file or directory) by path."""
    if name_or_path in MODEL_PRESETS:
        return MODEL_PRESETS[name_or_path]
    if os.path.exists(name_or_path) or name_or_path.endswith(".json") or os.sep in name_or_path:
        from planner.model import load_hf_config

        if not os.path.exists(name_or_path):
            raise SpecError("file not found", source=name_or_path)
        return load_hf_config(name_or_path)
    near = closest_names(name_or_path, list(MODEL_PRESETS))
    raise SpecError(
        f"unknown model preset {name_or_path!r}"
        + (f"; closest: {', '.join(near)}" if near else "")
        + f". Known: {', '.join(MODEL_PRESETS)}; or pass a path to an HF config.json",
        field="model",
    )


_CLUSTER_DIR = os.path.join(os.path.dirname(__file__), "presets")


def cluster_preset_names() -> list[str]:
    names = sorted(f[: -len(".yaml")] for f in os.listdir(_CLUSTER_DIR) if f.endswith(".yaml"))
    return names + ["local"]


def resolve_cluster(name_or_path: str, *, nodes: int | None = None):  # -> ClusterSpec
    """A cluster preset by name or a ClusterSpec YAML by path, optionally resized to `nodes`.

    `local` (this machine) is resolved by the launcher, which can run the probe.
    """
    from planner.cluster import load_cluster

    preset = os.path.join(_CLUSTER_DIR, f"{name_or_path}.yaml")
    if os.path.isfile(preset):
        cluster = load_cluster(preset)
    elif os.path.exists(name_or_path) or name_or_path.endswith((".yaml", ".yml", ".json")):
        cluster = load_cluster(name_or_path)
    else:
        near = closest_names(name_or_path, cluster_preset_names())
        raise SpecError(
            f"unknown cluster preset {name_or_path!r}"
            + (f"; closest: {', '.join(near)}" if near else "")
            + f". Known: {', '.join(cluster_preset_names())}; or pass a path to a cluster YAML",
            field="cluster",
        )
    return cluster.with_nodes(nodes) if nodes is not None else cluster
