"""Parameter-importance scores and top-k selection shared by the score-based methods.

PIECE (piece.md §3.2–3.4):

- Fisher importance, eq. 4:  F_i = 1/|D| Σ_{(x,y)∈D} (∂ log p_θ(y|x) / ∂θ_i)²
- Second-order normalised importance, eq. 10:
  S_i = |1/|D| Σ g_i| / (sqrt(1/|D| Σ g_i²) + ξ),  g = ∂ log p_θ(y|x) / ∂θ
- Top-k selection, eq. 12: k = ⌊sparsity · |θ|⌋ entries with the largest score.

``log p_θ(y|x)`` is the summed log-likelihood of the answer tokens given the prompt
(``clbench.data.encoding.answer_log_likelihood``), and ``g`` is taken per sample, as the equations say.

The authors' public code differs (``variant="authors_code"``): gradients of micro-batches of
``micro_batch_size`` examples are summed (not per sample), the sums are kept in bfloat16, the Fisher score is
the sum of squared micro-batch gradients, and PIECE-S is |Σg| / sqrt(Σg² + 1). See docs/paper_vs_code.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from clbench.data.encoding import Example, EncodingPolicy, answer_log_likelihood, collate_for_training, encode_for_training

ScoreKind = Literal["fisher", "sno"]
Variant = Literal["paper", "authors_code"]

# PIECE's code never selects embeddings (tied with the output head in small Llamas).
DEFAULT_EXCLUDE = (r"embed", r"lm_head", r"\bwte\b", r"\bwpe\b")


def eligible_parameters(
    model: nn.Module, include: Sequence[str] = (r".*",), exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> dict[str, nn.Parameter]:
    """Named parameters whose name matches an ``include`` regex and no ``exclude`` regex."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    return {
        name: p
        for name, p in model.named_parameters()
        if any(r.search(name) for r in inc) and not any(r.search(name) for r in exc)
    }


@dataclass
class GradientMoments:
    """Σg and Σg² over ``n`` gradient samples, per parameter tensor."""

    sum_grad: dict[str, torch.Tensor]
    sum_sq_grad: dict[str, torch.Tensor]
    n: int


def gradient_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    names: Iterable[str],
    policy: EncodingPolicy = EncodingPolicy(),
    micro_batch_size: int = 1,
    accumulate_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> GradientMoments:
    """First and second moments of ∇_θ log p_θ(y|x) over ``examples``.

    With ``micro_batch_size=1`` every sample's gradient is taken alone (the paper's per-sample quantity);
    larger values sum the gradients of each micro-batch first (the authors' code).
    """
    names = list(names)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    sum_grad = {n: torch.zeros_like(params[n], dtype=accumulate_dtype) for n in names}
    sum_sq = {n: torch.zeros_like(params[n], dtype=accumulate_dtype) for n in names}
    encoded = [encode_for_training(tokenizer, ex, policy, where=f"importance example {i}") for i, ex in enumerate(examples)]
    was_training = model.training
    model.eval()  # no dropout: the score is a property of θ, not of a random mask
    requires = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in sum_grad)
    batches = [encoded[i : i + micro_batch_size] for i in range(0, len(encoded), micro_batch_size)]
    try:
        for chunk in tqdm(batches, desc="importance", disable=None if progress else True, leave=False):
            batch = {k: v.to(device) for k, v in collate_for_training(chunk, tokenizer.pad_token_id).items()}
            model.zero_grad(set_to_none=True)
            answer_log_likelihood(model, batch).sum().backward()
            for n in names:
                g = params[n].grad
                if g is None:
                    continue
                g = g.to(accumulate_dtype)
                sum_grad[n] += g
                sum_sq[n] += g * g
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(requires[n])
        model.train(was_training)
    return GradientMoments(sum_grad, sum_sq, len(batches))


def fisher_diagonal(moments: GradientMoments) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher, PIECE eq. 4: the mean of squared per-sample gradients."""
    return {n: (s / moments.n).float() for n, s in moments.sum_sq_grad.items()}


def second_order_normalised(moments: GradientMoments, xi: float) -> dict[str, torch.Tensor]:
    """PIECE eq. 10: |mean g| / (sqrt(mean g²) + ξ)."""
    out = {}
    for n, s in moments.sum_grad.items():
        mean = s.float() / moments.n
        rms = (moments.sum_sq_grad[n].float() / moments.n).sqrt()
        out[n] = mean.abs() / (rms + xi)
    return out


def piece_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    kind: ScoreKind,
    xi: float = 1e-8,
    *,
    variant: Variant = "paper",
    names: Iterable[str] | None = None,
    policy: EncodingPolicy = EncodingPolicy(),
    micro_batch_size: int = 8,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """PIECE importance of every eligible parameter on ``examples`` (``{"prompt", "answer"}`` dicts).

    ``kind="fisher"``: PIECE-F, eq. 4. ``kind="sno"``: PIECE-S, eq. 10 with stability constant ``xi``.
    ``variant="authors_code"`` reproduces the public implementation instead (see module docstring);
    ``micro_batch_size`` only applies to that variant. ``names`` defaults to ``eligible_parameters(model)``.
    """
    if kind not in ("fisher", "sno"):
        raise ValueError(f"kind must be 'fisher' or 'sno', got {kind!r}")
    if variant not in ("paper", "authors_code"):
        raise ValueError(f"variant must be 'paper' or 'authors_code', got {variant!r}")
    names = list(names) if names is not None else list(eligible_parameters(model))
    if variant == "paper":
        moments = gradient_moments(model, tokenizer, examples, names, policy, 1, torch.float32, progress)
        return fisher_diagonal(moments) if kind == "fisher" else second_order_normalised(moments, xi)
    moments = gradient_moments(model, tokenizer, examples, names, policy, micro_batch_size, torch.bfloat16, progress)
    if kind == "fisher":
        return {n: s.float() for n, s in moments.sum_sq_grad.items()}
    return {n: s.float().abs() / (moments.sum_sq_grad[n].float() + 1.0).sqrt() for n, s in moments.sum_grad.items()}


def top_k_mask(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting exactly the ``k`` largest scores across all tensors (ties broken by position).

    Works tensor by tensor: each tensor contributes at most ``k`` candidates, so no concatenation of the
    whole model's scores is ever built.
    """
    total = sum(s.numel() for s in scores.values())
    if not 0 <= k <= total:
        raise ValueError(f"k={k} must be between 0 and the number of scored entries ({total})")
    if k == 0:
        return {n: torch.zeros_like(s, dtype=torch.bool) for n, s in scores.items()}
    candidates = torch.cat([s.detach().flatten().float().topk(min(k, s.numel())).values.cpu() for s in scores.values()])
    threshold = candidates.topk(k).values[-1]
    masks = {n: s.float() > threshold for n, s in scores.items()}
    remaining = k - sum(int(m.sum()) for m in masks.values())
    for n, s in scores.items():  # fill the last places from entries equal to the threshold, in order
        if remaining == 0:
            break
        ties = (s.float() == threshold).flatten().nonzero().flatten()[:remaining]
        masks[n].view(-1)[ties] = True
        remaining -= len(ties)
    return masks


def budget(sparsity: float, n_params: int) -> int:
    """k = ⌊sparsity · |θ|⌋ (PIECE §3.4)."""
    return int(sparsity * n_params)
