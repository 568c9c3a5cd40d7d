"""Shared helpers for the optimizer tests: a tiny Llama built from a config (random init, no download)."""

from __future__ import annotations

import warnings

import torch


def make_tiny_llama(
    *, seed: int = 0, vocab: int = 128, hidden: int = 32, ffn: int = 48, layers: int = 2, tie: bool = False
):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(config)


def llama_batches(
    n: int, *, vocab: int = 128, batch: int = 4, seq: int = 16, seed: int = 1
) -> list[torch.Tensor]:
    """``n`` batches cycling through 3 fixed random ones, so a few steps visibly lower the loss."""
    g = torch.Generator().manual_seed(seed)
    distinct = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(3)]
    return [distinct[i % 3] for i in range(n)]


def llama_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss
