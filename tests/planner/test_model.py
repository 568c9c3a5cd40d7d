"""ModelSpec parameter counts are exact: equal to transformers' own modules on the meta device."""

import json

import pytest
import torch
import transformers

from planner.errors import SpecError
from planner.model import from_hf_config, load_hf_config
from planner.presets import MODEL_PRESETS, resolve_model


def hf_params(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


HF_CONFIGS = {
    "llama-gqa-untied": transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
    ),
    "llama-tied-bias": transformers.LlamaConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=777, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
    ),
    "llama-head-dim": transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, vocab_size=500,
    ),
    "mistral": transformers.MistralConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=1024,
    ),
    "qwen2-tied": transformers.Qwen2Config(
        hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=1500, tie_word_embeddings=True,
    ),
    "qwen2-untied": transformers.Qwen2Config(
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=900, tie_word_embeddings=False,
    ),
    "gpt2": transformers.GPT2Config(n_embd=96, n_layer=3, n_head=4, vocab_size=1234, n_positions=128),
    "gpt2-inner": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_inner=100, vocab_size=300, n_positions=64),
    "gpt-neox": transformers.GPTNeoXConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
    ),
    "gpt-neox-tied": transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4, vocab_size=500,
        tie_word_embeddings=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_config_counts_are_exact(name, tmp_path):
    config = HF_CONFIGS[name]
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    spec = load_hf_config(path)
    assert spec.params == hf_params(config)
    # a directory holding config.json works the same
    assert resolve_model(str(tmp_path)).params == spec.params


# the published configs of the presets that transformers can build
PRESET_AS_HF = {
    "llama2-7b": transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    ),
    "llama2-70b": transformers.LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=32000,
    ),
    "llama3-8b": transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256,
    ),
    "mistral-7b": transformers.MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000,
    ),
    "gpt2": transformers.GPT2Config(),
    "gpt2-xl": transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PRESET_AS_HF))
def test_presets_match_transformers(name):
    assert MODEL_PRESETS[name].params == hf_params(PRESET_AS_HF[name])


def test_published_totals():
    # Narayanan et al. 2021 Table 1: the 1T configuration has 1008B parameters
    assert round(MODEL_PRESETS["megatron-1t"].params / 1e9) == 1008
    # Brown et al. 2020: GPT-3 "175B"
    assert 174e9 < MODEL_PRESETS["gpt3-175b"].params < 176e9
    assert MODEL_PRESETS["llama3-70b"].params == 70_553_706_496


def test_unsupported_model_type_names_the_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    with pytest.raises(SpecError, match="model_type") as e:
        load_hf_config(path)
    assert str(path) in str(e.value)


def test_missing_key_names_the_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(SpecError, match="num_attention_heads"):
        from_hf_config(json.loads(path.read_text()), source=str(path))


def test_gqa_divisibility_is_checked():
    with pytest.raises(ValueError, match=r"num_heads\(6\) % num_kv_heads\(4\)"):
        MODEL_PRESETS["tiny-llama"].replace(num_heads=6, num_kv_heads=4, head_dim=16)
