"""Shared fixtures: a tiny randomly initialised Llama and the shipped 512-token stories260k tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from clbench.models import asset_path


@pytest.fixture(scope="session")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(asset_path("stories260k"))
    tok.pad_token = tok.unk_token
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


@pytest.fixture
def tiny_model_and_tokenizer(tokenizer):
    """A fresh tiny model per test (no state leaks between tests) and the shared tokenizer."""
    return build_tiny_model(len(tokenizer)), tokenizer


@pytest.fixture
def make_tiny_model(tokenizer):
    """Builds a tiny model with LlamaConfig overrides, e.g. ``make_tiny_model(initializer_range=0.1)``."""
    return lambda **overrides: build_tiny_model(len(tokenizer), **overrides)
