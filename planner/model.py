"""ModelSpec: a decoder-only transformer as numbers, with exact parameter counts.

Built from a preset name (`planner.presets`), an HF `config.json`, or by hand.
The parameter count is exact for the families we read (Llama, Mistral, Qwen2,
GPT-2, GPT-NeoX): it is checked in tests against transformers' own modules
instantiated on the meta device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from planner.errors import SpecError

Family = Literal["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "gpt"]
NormKind = Literal["rmsnorm", "layernorm"]
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
    def attention_params(self) -> int:
        h = self.hidden_size
        qkv = h * (self.q_size + 2 * self.kv_size)
        qkv_b = (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        out = self.q_size * h + (h if self.attn_out_bias else 0)
        return qkv + qkv_b + out

    @property
    def mlp_params(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        n_in = 2 if self.gated_mlp else 1  # gate + up, or just up
        weights = n_in * h * f + f * h
        biases = (n_in * f + h) if self.mlp_bias else 0
        return weights + biases

    @property
    def layer_params(self) -> int:
        """One transformer block: attention, MLP and its two norms."""
        return self.attention_params + self.mlp_params + 2 * self.norm_params

    @property
    def embedding_params(self) -> int:
        pos = self.max_position_embeddings * self.hidden_size if self.position == "learned" else 0
        return self.vocab_size * self.hidden_size + pos

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """Total parameters, counting tied embeddings once."""
        return (
            self.embedding_params
            + self.num_layers * self.layer_params
            + self.norm_params  # final norm
            + self.lm_head_params
        )

    def layer_param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The weight and bias shapes of one block (used for per-tensor optimizer state)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("q", (self.q_size, h)),
            ("k", (self.kv_size, h)),
            ("v", (self.kv_size, h)),
            ("o", (h, self.q_size)),
            ("up", (f, h)),
            ("down", (h, f)),
        ]
        if self.gated_mlp:
            shapes.append(("gate", (f, h)))
        vec = [("norm1", (h,)), ("norm2", (h,))]
        if self.norm == "layernorm":
            vec += [("norm1_bias", (h,)), ("norm2_bias", (h,))]
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
    "num_kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "ffn_hidden_size": ("intermediate_size", "n_inner"),
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


def from_hf_config(cfg: dict[str, Any], *, name: str | None = None, source: str | None = None) -> ModelSpec:
    """A ModelSpec from the fields of an HF `config.json` (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX)."""
    model_type = cfg.get("model_type")
    label = name or cfg.get("_name_or_path") or model_type or "hf-model"
    _check_hf_numbers(cfg, source)
    try:
        if model_type in ("llama", "mistral", "qwen2"):
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            attention_bias = bool(cfg.get("attention_bias", False))
            return ModelSpec(
                name=str(label),
                family=model_type,
                num_layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
                head_dim=int(_get(cfg, "head_dim", default=hidden // heads)),
                ffn_hidden_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                position="rope",
                gated_mlp=True,
                activation=str(cfg.get("hidden_act", "silu")),
                norm="rmsnorm",
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases and no output bias
                qkv_bias=True if model_type == "qwen2" else attention_bias,
                attn_out_bias=False if model_type == "qwen2" else attention_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
            )
        if model_type == "gpt2":
            hidden = int(cfg["n_embd"])
            return ModelSpec(
                name=str(label),
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
            )
        if model_type == "gpt_neox":
            heads = int(cfg["num_attention_heads"])
            attention_bias = bool(cfg.get("attention_bias", True))
            return ModelSpec(
                name=str(label),
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
            )
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
        f"unsupported model_type {model_type!r}; supported: llama, mistral, qwen2, gpt2, gpt_neox",
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


def to_hf_config_dict(spec: ModelSpec, *, dropout: float = 0.0) -> dict[str, Any]:
    """The fields of an HF `config.json` that builds this model (for `transformers.AutoConfig.for_model`)."""
    if spec.family in ("llama", "mistral", "qwen2"):
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
        if spec.family == "llama":
            d["attention_bias"] = spec.qkv_bias
            d["mlp_bias"] = spec.mlp_bias
        return d
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
