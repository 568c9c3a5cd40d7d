"""ModelSpec: a decoder-only transformer as numbers, with exact parameter counts.

Built from a preset name (`planner.presets`), an HF `config.json`, or by hand.
The parameter count is exact for the families we read (Llama, Mistral, Qwen2, Qwen3,
Phi-3, Gemma 2/3, Falcon, OLMo 2, GPT-2, GPT-NeoX and the mixtures of experts Mixtral,
Qwen2-MoE, Qwen3-MoE): it is checked in tests against transformers' own modules
instantiated on the meta device. What differs between the families is read from the
config as features (norms per block, QK-norm, parallel attention/MLP, biases, experts),
not kept in per-family tables; per-family code only names the config keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from planner.errors import SpecError

Family = Literal[
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "falcon", "olmo2", "gpt2",
    "gpt_neox", "gpt", "mixtral", "qwen2_moe", "qwen3_moe",
]  # fmt: skip
# the families whose blocks are Llama's (pre-norm RMSNorm, rotary, SDPA, gated MLP) up to the features
# ModelSpec names: their activations follow one formula (planner.memory.token_coefficients)
LLAMA_LIKE: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "olmo2", "mixtral", "qwen2_moe",
    "qwen3_moe",
)  # fmt: skip
NormKind = Literal["rmsnorm", "layernorm"]
QKNorm = Literal["none", "head", "full"]
PositionKind = Literal["rope", "learned"]

_POS = {"positive": True}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    family: Family = "llama"
    num_layers: int = field(metadata=_POS)
    hidden_size: int = field(metadata=_POS)
    num_heads: int = field(metadata=_POS)
    num_kv_heads: int = field(default=0, metadata={"min": 0})  # 0: same as num_heads (MHA)
    head_dim: int = field(default=0, metadata={"min": 0})  # 0: hidden_size // num_heads
    ffn_hidden_size: int = field(metadata=_POS)
    vocab_size: int = field(metadata=_POS)
    max_position_embeddings: int = field(default=2048, metadata=_POS)
    position: PositionKind = "rope"
    gated_mlp: bool = True  # SwiGLU-style: gate, up and down projections
    activation: str = "silu"
    norm: NormKind = "rmsnorm"
    tied_embeddings: bool = False
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    # norms in a block: 2 (pre-attention and pre-MLP, or OLMo 2's two post-norms), 4 (Gemma 2/3: pre and post
    # each sublayer), 1 (Falcon's parallel block with one LayerNorm)
    norms_per_block: int = field(default=2, metadata={"min": 1})
    qk_norm: QKNorm = (
        "none"  # RMSNorm on queries and keys: per head (Qwen3, Gemma 3) or over all heads (OLMo 2)
    )
    parallel_block: bool = False  # attention and MLP read the same input (GPT-NeoX, Falcon)
    fused_qkv: bool = False  # one q/k/v projection (Phi-3, Falcon, GPT-2): its output is saved whole
    # attention variants that change what runs, not the parameter count
    sliding_window: int = field(default=0, metadata={"min": 0})  # 0: every layer attends to all tokens
    sliding_layers: int = field(default=0, metadata={"min": 0})  # how many layers use the window
    attn_logit_softcap: float = field(default=0.0, metadata={"min": 0})  # Gemma 2: tanh capping (eager)
    final_logit_softcap: float = field(default=0.0, metadata={"min": 0})
    # mixture of experts (0 experts: a dense MLP); ffn_hidden_size is then one expert's width
    num_experts: int = field(default=0, metadata={"min": 0})
    experts_per_token: int = field(default=0, metadata={"min": 0})  # top-k
    shared_expert_ffn_size: int = field(default=0, metadata={"min": 0})  # Qwen2-MoE's always-on expert
    shared_expert_gate: bool = False  # a sigmoid gate (h -> 1) on the shared expert
    # dropout probabilities as the config sets them (what autograd keeps changes, not the parameter count):
    # on the attention probabilities, on each sublayer's output before its residual add, on the embeddings
    attn_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    hidden_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    embd_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})

    def __post_init__(self) -> None:
        from planner.schema import check_bounds

        check_bounds(self)  # also for specs read from an HF config.json or traced, not only from YAML
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size({self.hidden_size}) % num_heads({self.num_heads}) = "
                    f"{self.hidden_size % self.num_heads} != 0; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads({self.num_heads}) % num_kv_heads({self.num_kv_heads}) = "
                f"{self.num_heads % self.num_kv_heads} != 0"
            )
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"experts_per_token({self.experts_per_token}) must be in 1..num_experts({self.num_experts})"
            )
        if self.sliding_layers > self.num_layers:
            raise ValueError(f"sliding_layers({self.sliding_layers}) > num_layers({self.num_layers})")

    # ---- parameter counts (exact) -------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def norm_params(self) -> int:
        # RMSNorm has a weight only; LayerNorm a weight and a bias
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    @property
    def qk_norm_params(self) -> int:
        if self.qk_norm == "head":
            return 2 * self.head_dim  # one norm of head_dim for the queries, one for the keys
        return self.q_size + self.kv_size if self.qk_norm == "full" else 0

    @property
    def attention_params(self) -> int:
        h = self.hidden_size
        qkv = h * (self.q_size + 2 * self.kv_size)
        qkv_b = (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        out = self.q_size * h + (h if self.attn_out_bias else 0)
        return qkv + qkv_b + out + self.qk_norm_params

    def ffn_params(self, width: int) -> int:
        """One feed-forward network of `width` (a dense MLP, one expert, or the shared expert)."""
        h = self.hidden_size
        n_in = 2 if self.gated_mlp else 1  # gate + up, or just up
        return n_in * h * width + width * h + ((n_in * width + h) if self.mlp_bias else 0)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def router_params(self) -> int:
        """The router (h -> experts, no bias) and the shared expert's gate (h -> 1)."""
        if not self.is_moe:
            return 0
        return self.hidden_size * self.num_experts + (self.hidden_size if self.shared_expert_gate else 0)

    @property
    def mlp_params(self) -> int:
        """The MLP of one block; with experts all of them, the router and the shared expert."""
        if not self.is_moe:
            return self.ffn_params(self.ffn_hidden_size)
        shared = self.ffn_params(self.shared_expert_ffn_size) if self.shared_expert_ffn_size else 0
        return self.num_experts * self.ffn_params(self.ffn_hidden_size) + shared + self.router_params

    @property
    def active_mlp_params(self) -> int:
        """The MLP parameters one token runs through: top-k experts, the shared one and the router."""
        if not self.is_moe:
            return self.mlp_params
        inactive = (self.num_experts - self.experts_per_token) * self.ffn_params(self.ffn_hidden_size)
        return self.mlp_params - inactive

    @property
    def block_vector_params(self) -> int:
        """The norms of one block (replicated under tensor parallelism)."""
        return self.norms_per_block * self.norm_params + self.qk_norm_params

    @property
    def layer_params(self) -> int:
        """One transformer block: attention, MLP (every expert) and its norms."""
        return self.attention_params + self.mlp_params + self.norms_per_block * self.norm_params

    @property
    def embedding_params(self) -> int:
        pos = self.max_position_embeddings * self.hidden_size if self.position == "learned" else 0
        return self.vocab_size * self.hidden_size + pos

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """Total parameters, counting tied embeddings once (with experts: all of them)."""
        return (
            self.embedding_params
            + self.num_layers * self.layer_params
            + self.norm_params  # final norm
            + self.lm_head_params
        )

    @property
    def active_params(self) -> int:
        """Parameters one token runs through (MoE: the top-k experts only; dense models: `params`)."""
        return self.params - self.num_layers * (self.mlp_params - self.active_mlp_params)

    def layer_param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The weight and bias shapes of one block (used for per-tensor optimizer state); experts as
        transformers holds them, one 3-D tensor per projection (experts x out x in)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        n_in = 2 if self.gated_mlp else 1
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("q", (self.q_size, h)),
            ("k", (self.kv_size, h)),
            ("v", (self.kv_size, h)),
            ("o", (h, self.q_size)),
        ]
        if self.is_moe:
            e = self.num_experts
            shapes += [("experts_up", (e, n_in * f, h)), ("experts_down", (e, h, f)), ("router", (e, h))]
            if self.shared_expert_ffn_size:
                fs = self.shared_expert_ffn_size
                shapes += [("shared_up", (fs, h)), ("shared_down", (h, fs))]
                shapes += [("shared_gate", (fs, h))] if self.gated_mlp else []
            if self.shared_expert_gate:
                shapes.append(("shared_expert_gate", (1, h)))
        else:
            shapes += [("up", (f, h)), ("down", (h, f))] + ([("gate", (f, h))] if self.gated_mlp else [])
        vec = [(f"norm{i + 1}", (h,)) for i in range(self.norms_per_block)]
        if self.norm == "layernorm":
            vec += [(f"norm{i + 1}_bias", (h,)) for i in range(self.norms_per_block)]
        if self.qk_norm != "none":
            full = self.qk_norm == "full"
            vec += [("q_norm", (self.q_size if full else self.head_dim,))]
            vec += [("k_norm", (self.kv_size if full else self.head_dim,))]
        if self.qkv_bias:
            vec += [("q_bias", (self.q_size,)), ("k_bias", (self.kv_size,)), ("v_bias", (self.kv_size,))]
        if self.attn_out_bias:
            vec.append(("o_bias", (h,)))
        if self.mlp_bias:
            vec += [("up_bias", (f,)), ("down_bias", (h,))] + (
                [("gate_bias", (f,))] if self.gated_mlp else []
            )
        return shapes + vec

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "params": self.params,
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "ffn": self.ffn_hidden_size,
            "vocab": self.vocab_size,
            "tied_embeddings": self.tied_embeddings,
            "params_per_layer": self.layer_params,
            "embedding_params": self.embedding_params,
            **(
                {
                    "experts": self.num_experts,
                    "experts_per_token": self.experts_per_token,
                    "active_params": self.active_params,
                }
                if self.is_moe
                else {}
            ),
        }

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)


# ---- from an HF config.json -------------------------------------------------------


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    return default


# ModelSpec field -> the config.json keys it is read from (to name the user's key in an error)
_HF_KEYS = {
    "num_layers": ("num_hidden_layers", "n_layer"),
    "hidden_size": ("hidden_size", "n_embd"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "ffn_hidden_size": ("intermediate_size", "n_inner", "moe_intermediate_size", "ffn_hidden_size"),
    "num_experts": ("num_local_experts", "num_experts"),
    "experts_per_token": ("num_experts_per_tok",),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
}


def _check_hf_numbers(cfg: dict[str, Any], source: str | None) -> None:
    """config.json's size fields are whole numbers (null where HF allows a default); and without an explicit
    head_dim, hidden_size must split evenly into the heads (transformers would truncate head_dim)."""
    for key in (k for keys in _HF_KEYS.values() for k in keys):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SpecError(f"expected a whole number, got {value!r}", field=key, source=source)
        if value is not None and value <= 0:  # transformers has no meaning for 0 here (0 kv heads is not MHA)
            raise SpecError(f"must be > 0, got {value}", field=key, source=source)
    hidden, heads = (
        cfg.get("hidden_size", cfg.get("n_embd")),
        cfg.get("num_attention_heads", cfg.get("n_head")),
    )
    if not (cfg.get("head_dim") is None and isinstance(hidden, int) and isinstance(heads, int)):
        return
    if heads > 0 and hidden > 0 and hidden % heads:
        raise SpecError(
            f"hidden_size({hidden}) % num_attention_heads({heads}) = {hidden % heads} != 0: transformers "
            f"would truncate head_dim to {hidden // heads}; set head_dim explicitly if that is meant",
            field="num_attention_heads",
            source=source,
        )


def _hf_key(cfg: dict[str, Any], field_name: str | None) -> str | None:
    keys = _HF_KEYS.get(field_name or "", ())
    return next((k for k in keys if k in cfg), keys[0] if keys else field_name)


_MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (*LLAMA_LIKE, "falcon", "gpt2", "gpt_neox")


def _sliding(cfg: dict[str, Any], model_type: str, layers: int) -> tuple[int, int]:
    """(window, layers that use it): from `layer_types` where the config lists them, else by family."""
    window = int(_get(cfg, "sliding_window", default=0) or 0)
    if not window or cfg.get("use_sliding_window") is False:
        return 0, 0
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        return window, sum(t == "sliding_attention" for t in types[:layers])
    if model_type == "gemma2":  # every other layer, the first sliding
        return window, (layers + 1) // 2
    if model_type == "gemma3_text":  # (pattern - 1) sliding layers, then a global one
        pattern = int(_get(cfg, "sliding_window_pattern", "_sliding_window_pattern", default=6))
        return window, sum((i + 1) % pattern != 0 for i in range(layers))
    return window, layers


def _experts(cfg: dict[str, Any], model_type: str, source: str | None) -> dict[str, Any]:
    """The MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config (every block sparse, as the search and the
    runtime assume: a config with dense blocks among the sparse ones is refused)."""
    if model_type not in _MOE_FAMILIES:
        return {}
    sparse_step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = cfg.get("mlp_only_layers") or []
    if sparse_step != 1 or dense:
        raise SpecError(
            f"dense blocks among the experts (decoder_sparse_step={sparse_step}, mlp_only_layers={dense}) are "
            "not modelled: every block must be sparse",
            field="mlp_only_layers" if dense else "decoder_sparse_step",
            source=source,
        )
    qwen2 = model_type == "qwen2_moe"
    return {
        "num_experts": int(_get(cfg, "num_local_experts", "num_experts")),
        "experts_per_token": int(cfg["num_experts_per_tok"]),
        "ffn_hidden_size": int(
            cfg["intermediate_size" if model_type == "mixtral" else "moe_intermediate_size"]
        ),
        "shared_expert_ffn_size": int(cfg.get("shared_expert_intermediate_size") or 0) if qwen2 else 0,
        "shared_expert_gate": qwen2 and bool(cfg.get("shared_expert_intermediate_size")),
    }


def _llama_like(cfg: dict[str, Any], label: str, model_type: str, source: str | None) -> ModelSpec:
    """Llama and the families that differ from it only in features ModelSpec names."""
    heads, hidden, layers = (
        int(cfg["num_attention_heads"]),
        int(cfg["hidden_size"]),
        int(cfg["num_hidden_layers"]),
    )
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias, out_bias = attention_bias, attention_bias
    if model_type in ("qwen2", "qwen2_moe"):  # q/k/v biases always (Qwen2-MoE: `qkv_bias`), no output bias
        qkv_bias, out_bias = bool(cfg.get("qkv_bias", True)), False
    if model_type == "phi3":  # Phi-3's fused qkv_proj and o_proj have no biases
        qkv_bias = out_bias = False
    gemma = model_type in ("gemma2", "gemma3_text")
    window, sliding_layers = _sliding(cfg, model_type, layers)
    fields: dict[str, Any] = {
        "ffn_hidden_size": int(cfg["intermediate_size"]),
        **_experts(cfg, model_type, source),
    }
    return ModelSpec(
        name=label,
        family=model_type,  # type: ignore[arg-type]  # one of LLAMA_LIKE
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_get(cfg, "head_dim", default=hidden // heads)),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        position="rope",
        gated_mlp=True,
        activation=str(_get(cfg, "hidden_activation", "hidden_act", default="silu")),
        norm="rmsnorm",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        qkv_bias=qkv_bias,
        attn_out_bias=out_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        norms_per_block=4 if gemma else 2,
        qk_norm={"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head", "olmo2": "full"}.get(
            model_type, "none"
        ),  # type: ignore[arg-type]
        fused_qkv=model_type == "phi3",
        sliding_window=window,
        sliding_layers=sliding_layers,
        attn_logit_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_logit_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        attn_dropout=float(cfg.get("attention_dropout") or 0.0),
        # Phi-3's dropout on each sublayer's output and on the embeddings
        hidden_dropout=float(cfg.get("resid_pdrop") or 0.0) if model_type == "phi3" else 0.0,
        embd_dropout=float(cfg.get("embd_pdrop") or 0.0) if model_type == "phi3" else 0.0,
        **fields,
    )


def _falcon(cfg: dict[str, Any], label: str) -> ModelSpec:
    """Falcon: fused qkv (multi-query, or grouped with the new decoder architecture), LayerNorms, GELU MLP;
    parallel attention/MLP behind one LayerNorm (two with the new architecture), or sequential."""
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    new_arch, parallel = (
        bool(cfg.get("new_decoder_architecture", False)),
        bool(cfg.get("parallel_attn", True)),
    )
    if new_arch:
        kv_heads = int(_get(cfg, "num_kv_heads", default=heads))
    else:
        kv_heads = 1 if cfg.get("multi_query", True) else heads
    ln_parallel = _get(cfg, "num_ln_in_parallel_attn", default=2 if new_arch else 1)
    bias = bool(cfg.get("bias", False))
    return ModelSpec(
        name=label,
        family="falcon",
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        ffn_hidden_size=int(_get(cfg, "ffn_hidden_size", default=4 * hidden)),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        position="rope",
        gated_mlp=False,
        activation=str(cfg.get("activation", "gelu")),
        norm="layernorm",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        norms_per_block=2 if not parallel or int(ln_parallel) == 2 else 1,
        parallel_block=parallel,
        fused_qkv=True,
        attn_dropout=float(cfg.get("attention_dropout") or 0.0),
        hidden_dropout=float(cfg.get("hidden_dropout") or 0.0),
    )


def _gpt2(cfg: dict[str, Any], label: str) -> ModelSpec:
    hidden = int(cfg["n_embd"])
    return ModelSpec(
        name=label,
        family="gpt2",
        num_layers=int(cfg["n_layer"]),
        hidden_size=hidden,
        num_heads=int(cfg["n_head"]),
        ffn_hidden_size=int(_get(cfg, "n_inner", default=4 * hidden)),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("n_positions", 1024)),
        position="learned",
        gated_mlp=False,
        activation=str(cfg.get("activation_function", "gelu_new")),
        norm="layernorm",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        fused_qkv=True,
        attn_dropout=float(cfg.get("attn_pdrop", 0.1)),  # (GPT2Config's defaults)
        hidden_dropout=float(cfg.get("resid_pdrop", 0.1)),
        embd_dropout=float(cfg.get("embd_pdrop", 0.1)),
    )


def _gpt_neox(cfg: dict[str, Any], label: str) -> ModelSpec:
    heads = int(cfg["num_attention_heads"])
    attention_bias = bool(cfg.get("attention_bias", True))
    return ModelSpec(
        name=label,
        family="gpt_neox",
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        num_heads=heads,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        position="rope",
        gated_mlp=False,
        activation=str(cfg.get("hidden_act", "gelu")),
        norm="layernorm",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        attn_out_bias=attention_bias,
        mlp_bias=True,
        parallel_block=bool(cfg.get("use_parallel_residual", True)),
        fused_qkv=True,
        attn_dropout=float(cfg.get("attention_dropout") or 0.0),
        hidden_dropout=float(cfg.get("hidden_dropout") or 0.0),  # (also on the embeddings)
        embd_dropout=float(cfg.get("hidden_dropout") or 0.0),
    )


def from_hf_config(cfg: dict[str, Any], *, name: str | None = None, source: str | None = None) -> ModelSpec:
    """A ModelSpec from the fields of an HF `config.json` (the families of `SUPPORTED_MODEL_TYPES`)."""
    model_type = cfg.get("model_type")
    label = str(name or cfg.get("_name_or_path") or model_type or "hf-model")
    _check_hf_numbers(cfg, source)
    try:
        if model_type in LLAMA_LIKE:
            return _llama_like(cfg, label, str(model_type), source)
        if model_type == "falcon":
            return _falcon(cfg, label)
        if model_type == "gpt2":
            return _gpt2(cfg, label)
        if model_type == "gpt_neox":
            return _gpt_neox(cfg, label)
    except KeyError as e:
        raise SpecError(
            f"missing required key for model_type {model_type!r}", field=str(e.args[0]), source=source
        ) from None
    except SpecError as e:
        raise SpecError(e.message, field=_hf_key(cfg, e.field), source=source) from None
    except ZeroDivisionError:
        zero = [k for k in ("num_attention_heads", "n_head") if cfg.get(k) == 0]
        raise SpecError("must be > 0, got 0", field=zero[0] if zero else None, source=source) from None
    except (TypeError, ValueError) as e:
        raise SpecError(str(e), source=source) from None
    raise SpecError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
        field="model_type",
        source=source,
    )


def load_hf_config(path: str | os.PathLike[str]) -> ModelSpec:
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    from planner.schema import load_mapping

    cfg = load_mapping(p) if p.endswith((".yaml", ".yml")) else _load_json(p)
    return from_hf_config(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(p))) or None, source=p)


def _load_json(p: str) -> dict[str, Any]:
    from planner.schema import load_mapping

    if not p.endswith(".json"):
        with open(p, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as e:
                raise SpecError(f"malformed JSON: {e.msg}", source=p, line=e.lineno) from None
        if not isinstance(data, dict):
            raise SpecError("expected a JSON object", source=p, line=1)
        return data
    return load_mapping(p)


def _llama_like_hf(spec: ModelSpec, dropout: float) -> dict[str, Any]:
    d: dict[str, Any] = {
        "model_type": spec.family,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tied_embeddings,
        "hidden_act": spec.activation,
        "attention_dropout": dropout,
    }
    if spec.family in ("llama", "olmo2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text"):
        d["attention_bias"] = spec.qkv_bias
    if spec.family == "llama":
        d["mlp_bias"] = spec.mlp_bias
    if spec.family == "qwen2_moe":
        d["qkv_bias"] = spec.qkv_bias
    if spec.family == "phi3":
        d.pop("head_dim")  # hidden / heads
        d.update(resid_pdrop=dropout, embd_pdrop=dropout)
    if spec.family in ("gemma2", "gemma3_text"):
        d["hidden_activation"] = d.pop("hidden_act")
        d["query_pre_attn_scalar"] = spec.head_dim
        d["attn_logit_softcapping"] = spec.attn_logit_softcap or None
        d["final_logit_softcapping"] = spec.final_logit_softcap or None
    if spec.sliding_window:
        d["sliding_window"] = spec.sliding_window
    if spec.is_moe:
        d["num_experts_per_tok"] = spec.experts_per_token
        if spec.family == "mixtral":
            d.update(num_local_experts=spec.num_experts, router_jitter_noise=0.0)
        else:
            d.update(num_experts=spec.num_experts, moe_intermediate_size=spec.ffn_hidden_size)
            d["shared_expert_intermediate_size"] = spec.shared_expert_ffn_size
    return d


def to_hf_config_dict(spec: ModelSpec, *, dropout: float = 0.0) -> dict[str, Any]:
    """The fields of an HF `config.json` that builds this model (for `transformers.AutoConfig.for_model`)."""
    if spec.family in LLAMA_LIKE:
        return _llama_like_hf(spec, dropout)
    if spec.family == "falcon":
        new_arch = spec.parallel_block and spec.norms_per_block == 2
        return {
            "model_type": "falcon",
            "hidden_size": spec.hidden_size,
            "ffn_hidden_size": spec.ffn_hidden_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_kv_heads": spec.num_kv_heads,
            "new_decoder_architecture": new_arch,
            "multi_query": not new_arch and spec.num_kv_heads == 1,
            "parallel_attn": spec.parallel_block,
            "bias": spec.qkv_bias,
            "activation": spec.activation,
            "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_position_embeddings,
            "tie_word_embeddings": spec.tied_embeddings,
            "attention_dropout": dropout,
            "hidden_dropout": dropout,
        }
    if spec.family in ("gpt2", "gpt"):
        return {
            "model_type": "gpt2",
            "n_embd": spec.hidden_size,
            "n_layer": spec.num_layers,
            "n_head": spec.num_heads,
            "n_inner": spec.ffn_hidden_size,
            "vocab_size": spec.vocab_size,
            "n_positions": spec.max_position_embeddings,
            "tie_word_embeddings": spec.tied_embeddings,
            "attn_pdrop": dropout,
            "resid_pdrop": dropout,
            "embd_pdrop": dropout,
        }
    if spec.family == "gpt_neox":
        return {
            "model_type": "gpt_neox",
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.ffn_hidden_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_position_embeddings,
            "tie_word_embeddings": spec.tied_embeddings,
            "attention_bias": spec.qkv_bias,
        }
    raise SpecError(f"no HF config for family {spec.family!r}", field="family")
