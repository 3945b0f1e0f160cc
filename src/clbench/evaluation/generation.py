"""Batched greedy generation with left padding and the KV cache (``model.generate``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from clbench.data.encoding import EncodingPolicy, cut_at_terminator, encode_for_generation, stop_token_ids


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    policy: EncodingPolicy,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions of ``prompts``: the text after the prompt up to the answer terminator, stripped.

    Prompts are sorted by length so that each batch pads little, then put back in input order.
    """
    encoded = [encode_for_generation(tokenizer, p, policy, max_new_tokens, where=f"{desc} prompt {i}")[0] for i, p in enumerate(prompts)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, policy)
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=None if progress else True, leave=False):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: every prompt ends at the last column
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
            )
            for row, i in enumerate(idx):
                outputs[i] = cut_at_terminator(tokenizer.decode(generated[row, width:], skip_special_tokens=True), policy)
    finally:
        model.train(was_training)
    return outputs
