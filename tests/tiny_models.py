"""Small randomly initialized Hugging Face models for tests (and the memory probe's test requests)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(
    seed: int = 0, *, vocab_size: int = 128, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64
) -> nn.Module:
    """A small randomly initialized LLaMA-config causal LM (for tests and benchmarks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).float()


def tiny_t5(seed: int = 0, *, vocab_size: int = 128, d_model: int = 32, layers: int = 2, heads: int = 4) -> nn.Module:
    """A small randomly initialized T5 (seq2seq) model."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=heads,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg).float()
