"""MIGU: magnitude-based gradient updating (PIECE supplementary B.3, eqs. 24–25; Du et al., 2024, PIECE ref. [14]).

For a linear layer with weight W ∈ R^{d_out×d_in} and input x, output channel i responds with

    h_i = W_i · x                                                        (PIECE eq. 24)

and its importance is the L1 norm of that response over the data,

    n_i = ‖h_i‖₁                                                         (PIECE eq. 25)

(``clbench.importance.output_magnitude``: summed over every non-padding token of the task's training
examples, without the bias). "During training, only the top 0.1% parameters ranked by these scores are
updated, while gradients on the remaining parameters are masked out, making the update pattern consistent
with our proposed method" (PIECE B.3): the masks are applied exactly as PIECE's, by
``clbench.masking.MaskedUpdate`` (eq. 13).

Choices where the paper is silent (config keys under ``method``):

- which parameters of a row count: every weight entry W_ij of row i gets the row's score n_i, so the
  selection takes whole rows (output channels), which is what MIGU masks. Biases and every parameter that
  is not an eligible linear weight are frozen (``others: freeze``).
- ``eligible``: nn.Linear weights of the transformer blocks, i.e. the weights of ``nn.Linear`` modules whose
  parameter name passes ``eligible.include`` / ``eligible.exclude`` (default: embeddings and the LM head
  excluded, as PIECE excludes them).
- ``ratio``: the budget, default ``${model.sparsity}`` (0.1% on the paper's models, the same k as PIECE, as
  the paper says; the micro models use their calibrated PIECE sparsity).
- ``budget``: ``global`` (default): k = ⌊ratio · (number of eligible weight entries)⌋ entries chosen by a
  global top-k over the row scores broadcast to their rows (``importance.top_k_mask``): whole rows in
  decreasing n_i, the last row partly, ties broken by position (tensor order, then row, then column);
  ``per_layer``: ⌊ratio · numel⌋ entries of every tensor (``importance.top_fraction_per_tensor``);
  ``quantile``: MIGU's code: in every tensor the rows with n_i ≥ the (1 − ratio) quantile of its n.
  n_i is not normalised across layers: a raw L1 sum grows with the layer's output scale, and the paper
  does not normalise it.
- ``refresh``: ``task`` (default, the PIECE paper's baseline): scores computed once at task start on the
  task's training data at θ_{t−1}; ``step``: MIGU's code: scores from the forward passes of the current
  optimiser step (all its micro-batches), recorded by forward hooks installed at task start, a fresh mask
  for every step (``refresh_selection``; the loop then restores unselected entries after each step).
- ``first_task``: ``masked`` (default: the paper describes no exception) or ``full`` (MIGU's code trains
  the first task with no mask at all).
- ``others``: ``freeze`` (default) or ``train`` (MIGU's code masks only the linear layers, so embeddings
  and norms train fully).
- ``importance_samples``: score on at most this many training examples (default: all of D_t);
  ``magnitude_batch_size``: batch size of the scoring passes (padding is masked, so it only changes the
  order of float additions).

Paper versus code (docs/paper_vs_code.md). MIGU's official code (github.com/wenyudu/MIGU,
``src/accelerate_local.py`` and ``src/uie_trainer_ft.py``, ``ini_threshold=0.7``) is reproduced by
``method.ratio=0.3 method.budget=quantile method.refresh=step method.first_task=full method.others=train``
except for three details: it sums |W·x + b| over padding tokens too (the models here have no biases; the
padding is excluded here), it also masks the LM head rows, and it averages the sums across data-parallel
ranks. The PIECE authors' own MIGU baseline (``training/baselines/model/Dynamic_network/MIGU.py``) instead
selects input channels of the hidden size per decoder layer from a helper that is not in their public
release, and lets every tensor without a mask file (down projections, LM head, final norm) train fully; it
is not reproduced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from clbench import importance
from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register

CHOICES = {
    "refresh": ("task", "step"),
    "budget": ("global", "per_layer", "quantile"),
    "first_task": ("masked", "full"),
    "others": ("freeze", "train"),
}


def linear_weights(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Parameter]:
    """Eligible weights of ``nn.Linear`` modules (W ∈ R^{d_out×d_in} of eq. 24), by parameter name."""
    named = importance.eligible_parameters(model, include, exclude)
    modules = dict(model.named_modules())
    return {
        n: p
        for n, p in named.items()
        if n.endswith(".weight") and isinstance(modules.get(n[: -len(".weight")]), nn.Linear)
    }


def row_masks(row_scores: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], ratio: float, budget: str) -> dict[str, torch.Tensor]:
    """Entry masks from per-row scores: every entry of row i carries n_i (see the module docstring)."""
    if budget == "quantile":
        masks = {}
        for n, s in row_scores.items():
            rows = s.float() >= torch.quantile(s.float(), 1.0 - ratio)
            masks[n] = rows.unsqueeze(1).expand(shapes[n]).clone()
        return masks
    broadcast = {n: s.float().unsqueeze(1).expand(shapes[n]) for n, s in row_scores.items()}
    if budget == "per_layer":
        return importance.top_fraction_per_tensor(broadcast, ratio)
    total = sum(b.numel() for b in broadcast.values())
    return importance.top_k_mask(broadcast, importance.budget(ratio, total))


class _RowMagnitudes:
    """Forward hooks that sum ‖W_i·x‖₁ per output row over the non-padding tokens of every forward pass
    since the last ``take()`` (MIGU's code: the micro-batches of the current optimiser step)."""

    def __init__(self, model: nn.Module, weight_names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.sums: dict[str, torch.Tensor] = {}
        self._token_mask: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        for name in weight_names:
            self._handles.append(modules[name[: -len(".weight")]].register_forward_hook(self._recorder(name)))

    def _capture_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self._token_mask = None if mask is None else mask.detach().float()

    def _recorder(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            with torch.no_grad():
                h = output.detach() if module.bias is None else output.detach() - module.bias  # W·x, eq. 24
                h = h.abs().float()
                mask = self._token_mask
                if mask is not None and h.dim() == 3 and tuple(mask.shape) == tuple(h.shape[:2]):
                    h = h * mask.unsqueeze(-1)  # padding tokens are not data
                row_sum = h.reshape(-1, h.shape[-1]).sum(dim=0)
                self.sums[name] = self.sums[name] + row_sum if name in self.sums else row_sum

        return record

    def take(self) -> dict[str, torch.Tensor]:
        sums, self.sums = self.sums, {}
        return sums

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@register("migu")
class MIGU(Method):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self._recorder: _RowMagnitudes | None = None
        self._shapes: dict[str, torch.Size] = {}
        self._others: dict[str, None] = {}

    @property  # type: ignore[override]
    def changes_selection_during_task(self) -> bool:  # a fresh mask every step needs the loop's restore
        return self.cfg.refresh == "step"

    def check(self, run_cfg: DictConfig) -> None:
        if not 0 < self.cfg.ratio <= 1:
            raise ConfigError(f"method.ratio={self.cfg.ratio} must be in (0, 1]")
        for key, allowed in CHOICES.items():
            if self.cfg[key] not in allowed:
                raise ConfigError(f"method.{key}={self.cfg[key]!r} must be one of {list(allowed)}")
        if self.cfg.magnitude_batch_size < 1:
            raise ConfigError(f"method.magnitude_batch_size={self.cfg.magnitude_batch_size} must be ≥ 1")
        if self.cfg.importance_samples is not None and self.cfg.importance_samples < 1:
            raise ConfigError(f"method.importance_samples={self.cfg.importance_samples} must be ≥ 1 or null")
        for key in ("include", "exclude"):
            for pattern in self.cfg.eligible[key]:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"method.eligible.{key}: {pattern!r} is not a valid regex ({err})") from None

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        eligible = linear_weights(ctx.model, list(self.cfg.eligible.include), list(self.cfg.eligible.exclude))
        if not eligible:
            raise ConfigError("method.eligible selects no nn.Linear weight of this model")
        self._shapes = {n: p.shape for n, p in eligible.items()}
        train_others = self.cfg.others == "train"
        self._others = {n: None for n, p in ctx.model.named_parameters() if train_others and n not in eligible and p.requires_grad}
        n_eligible = sum(p.numel() for p in eligible.values())
        ctx.info.update(eligible=n_eligible, refresh=self.cfg.refresh)
        if ctx.index == 0 and self.cfg.first_task == "full":
            ctx.info.update(selected=sum(p.numel() for p in ctx.model.parameters() if p.requires_grad), first_task="full")
            return None
        if self.cfg.refresh == "step":
            # Every eligible tensor enters the optimiser now; refresh_selection narrows it before each step.
            self._recorder = _RowMagnitudes(ctx.model, list(eligible))
            return {**{n: torch.ones(s, dtype=torch.bool) for n, s in self._shapes.items()}, **self._others}
        examples = list(ctx.train)[: self.cfg.importance_samples]
        scores = importance.output_magnitude(ctx.model, ctx.tokenizer, examples, list(eligible), ctx.policy, self.cfg.magnitude_batch_size)
        masks = row_masks(scores, self._shapes, float(self.cfg.ratio), self.cfg.budget)
        selection: dict[str, torch.Tensor | None] = {n: m for n, m in masks.items() if m.any()}
        ctx.info.update(selected=sum(int(m.sum()) for m in masks.values()), tensors_touched=len(selection))
        return {**selection, **self._others}

    def refresh_selection(self, ctx: TaskContext, step: int) -> ParameterSelection:
        if self._recorder is None:
            return None
        scores = self._recorder.take()
        if not scores:
            return None
        masks = row_masks(scores, self._shapes, float(self.cfg.ratio), self.cfg.budget)
        return {**masks, **self._others}

    def task_end(self, ctx: TaskContext) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    # Masks are recomputed from the model at every task start (and every step), so there is no state to keep.
