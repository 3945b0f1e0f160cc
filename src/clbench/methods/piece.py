"""PIECE-F and PIECE-S (piece.md §3, Algorithm 1).

Before each task t, score every eligible parameter on D_t at θ_{t−1} — Fisher (eq. 4, PIECE-F) or the
second-order normalised score (eq. 10, PIECE-S) — keep the top k = ⌊sparsity·|θ|⌋ (eq. 12) and update only
those entries (eq. 13, applied by ``clbench.masking.MaskedUpdate``). No data or statistics of earlier tasks
are kept (the paper's no-history assumption), so the method has no state to checkpoint.

Choices where the paper is silent (config keys under ``method``):

- ``eligible``: which tensors may be selected. Default: every parameter except embeddings / LM head, as in
  the authors' code.
- ``budget_base``: |θ| in k = ⌊sparsity·|θ|⌋ counts the eligible parameters (default ``eligible``) or all
  parameters (``all``).
- ``xi``: ξ of eq. 10, default 1e-8 (the paper only says ξ > 0 is for numerical stability).
- ``variant``: ``paper`` (default) or ``authors_code`` (micro-batch sums in bf16, |Σg|/sqrt(Σg²+1), and a
  tensor with no selected entry trains *fully*); ``empty_tensor`` overrides that last point on its own.
- ``importance_samples``: score on at most this many training examples (default: all of D_t).
"""

from __future__ import annotations

from omegaconf import DictConfig

from clbench import importance
from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register


class PIECE(Method):
    score_kind: importance.ScoreKind

    def check(self, run_cfg: DictConfig) -> None:
        if not 0 < self.cfg.sparsity <= 1:
            raise ConfigError(f"method.sparsity={self.cfg.sparsity} must be in (0, 1]")
        if self.cfg.variant not in ("paper", "authors_code"):
            raise ConfigError(f"method.variant={self.cfg.variant!r} must be 'paper' or 'authors_code'")
        if self.cfg.budget_base not in ("eligible", "all"):
            raise ConfigError(f"method.budget_base={self.cfg.budget_base!r} must be 'eligible' or 'all'")
        if self.empty_tensor not in ("freeze", "train_full"):
            raise ConfigError(f"method.empty_tensor={self.cfg.empty_tensor!r} must be 'freeze', 'train_full' or null")

    @property
    def empty_tensor(self) -> str:
        if self.cfg.empty_tensor is not None:
            return self.cfg.empty_tensor
        return "freeze" if self.cfg.variant == "paper" else "train_full"

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        eligible = importance.eligible_parameters(ctx.model, self.cfg.eligible.include, self.cfg.eligible.exclude)
        examples = list(ctx.train)[: self.cfg.importance_samples]
        scores = importance.piece_scores(
            ctx.model,
            ctx.tokenizer,
            examples,
            self.score_kind,
            xi=self.cfg.xi,
            variant=self.cfg.variant,
            names=eligible,
            policy=ctx.policy,
            micro_batch_size=self.cfg.micro_batch_size,
            progress=ctx.progress,
        )
        base = sum(p.numel() for p in (eligible.values() if self.cfg.budget_base == "eligible" else ctx.model.parameters()))
        k = min(importance.budget(self.cfg.sparsity, base), sum(s.numel() for s in scores.values()))
        masks = importance.top_k_mask(scores, k)
        selection: dict = {n: m for n, m in masks.items() if m.any()}
        if self.empty_tensor == "train_full":
            selection.update({n: None for n, m in masks.items() if not m.any()})
        ctx.info.update(selected=k, eligible=sum(p.numel() for p in eligible.values()), tensors_touched=len(selection))
        return selection


@register("piece_f")
class PIECEF(PIECE):
    """PIECE-F: Fisher importance (eq. 4)."""

    score_kind = "fisher"


@register("piece_s")
class PIECES(PIECE):
    """PIECE-S: second-order normalised importance (eq. 10)."""

    score_kind = "sno"
