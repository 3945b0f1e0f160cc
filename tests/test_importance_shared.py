"""The shared scores that MIGU, TRACE and EPI build on, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clbench import importance


class EmbedLinear(nn.Module):
    """input ids → embedding → one linear layer: enough to check output magnitudes by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 4)
        self.proj = nn.Linear(4, 3, bias=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids))


def test_output_magnitude_is_l1_of_wx_over_real_tokens(tokenizer):
    model = EmbedLinear(len(tokenizer))
    examples = [{"prompt": "Lily has a ball.", "answer": "red"}, {"prompt": "Tom", "answer": "yes"}]
    scores = importance.output_magnitude(model, tokenizer, examples, ["proj.weight"], batch_size=2)
    expected = torch.zeros(3)
    for ex in examples:  # each example alone: no padding, so every token counts
        ids = importance.encode_for_training(tokenizer, ex, importance.EncodingPolicy()).input_ids
        x = model.embed(torch.tensor(ids))
        expected += (x @ model.proj.weight.T).abs().sum(dim=0).detach()  # bias excluded (eq. 24: W_i·x)
    torch.testing.assert_close(scores["proj.weight"], expected)


def test_cosine_specificity_by_hand():
    d0 = {"w": torch.tensor([1.0, 0.0])}
    d1 = {"w": torch.tensor([0.0, 1.0])}  # orthogonal to d0
    d2 = {"w": torch.tensor([1.0, 1.0])}  # 45° to both
    spec = importance.cosine_specificity([d0, d1, d2], task=0)
    assert spec["w"] == pytest.approx(1 - (0.0 + 1 / math.sqrt(2)) / 2)
    assert importance.cosine_specificity([d0, d0], task=1)["w"] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        importance.cosine_specificity([d0], task=0)


def test_delta_and_l2():
    delta = importance.parameter_delta({"w": torch.tensor([3.0, 5.0])}, {"w": torch.tensor([0.0, 1.0])}, ["w"])
    torch.testing.assert_close(delta["w"], torch.tensor([3.0, 4.0]))
    assert importance.tensor_l2(delta)["w"] == pytest.approx(5.0)


def test_ema_of_squared_gradients():
    s1 = importance.ema_squared_gradients(None, {"w": torch.tensor([2.0])}, beta=0.99)
    assert float(s1["w"]) == pytest.approx(0.01 * 4)
    s2 = importance.ema_squared_gradients(s1, {"w": torch.tensor([-1.0])}, beta=0.99)
    assert float(s2["w"]) == pytest.approx(0.99 * 0.04 + 0.01 * 1)


def test_minmax_normalise_scopes():
    scores = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([5.0, 5.0])}
    per_tensor = importance.minmax_normalise(scores, "tensor")
    torch.testing.assert_close(per_tensor["a"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(per_tensor["b"], torch.tensor([0.0, 0.0]))  # constant tensor
    overall = importance.minmax_normalise(scores, "global")
    torch.testing.assert_close(overall["a"], torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(overall["b"], torch.tensor([1.0, 1.0]))


def test_top_fraction_per_tensor():
    scores = {"a": torch.tensor([0.1, 0.9, 0.5, 0.3]), "b": torch.tensor([4.0, 1.0, 2.0, 3.0, 0.0, 5.0, 6.0, 7.0])}
    masks = importance.top_fraction_per_tensor(scores, 0.5)
    assert masks["a"].tolist() == [False, True, True, False]
    assert masks["b"].tolist() == [True, False, False, False, False, True, True, True]
