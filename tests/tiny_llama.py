"""A tiny random Llama written by the tests themselves (no download): 2 layers, 4 attention
heads, 2 KV heads (one per rank at tensor_parallel_size=2), bfloat16."""
from __future__ import annotations


def write_tiny_llama(path, vocab_size: int = 1000, **config) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **config)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)
