"""Shared test models: a tiny Llama with Llama-2's module names, small enough to build in milliseconds."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed=0, hidden=32):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()
