"""Joint (multi-task) fine-tuning: the upper reference of a task sequence.

The papers' joint baseline trains one model on the mixture of every task's data: TRACE-the-method (trace.md
§4, "Joint Fine-tuning ... directly mixes all SFT data for joint fine-tuning") and EPI (epi.md §3.2, "Full
Multi-task SFT: the model is fine-tuned on a uniform mixture of all datasets, updating all parameters").
There is no equation beyond the plain multi-task risk (epi.md eq. 1): θ* = argmin_θ Σ_k E_{D_k}[ℓ(f_θ(x), y)],
minimised here over the union of the tasks' training sets, shuffled together by the loop (a uniform mixture:
every example equally likely in a batch, so each task is weighted by its size, as in both papers).

The runner learns task by task and scores after each task, so the joint model is built incrementally:

- ``cumulative: true`` (default): at task t the loop trains on D_1 ∪ … ∪ D_t (incremental joint training,
  the usual upper bound of a task sequence); row t of R is a multi-task model of the tasks seen so far.
- ``cumulative: false``: nothing trains before the last task; at the last task the loop trains on the union
  of all tasks. Only the last row is meaningful (earlier rows score the base model); it is the papers'
  single joint model at 1/T of the cost of ``cumulative: true``.
- ``from_base: true`` (default): before each union is trained the weights are restored to θ₀, the weights
  the runner handed to ``prepare_model`` (it calls that hook before restoring any checkpoint, so θ₀ is the
  base model on a resumed run too). Every row is then a joint model trained from θ₀ exactly as the papers
  train theirs, and the last row *is* their joint baseline; no example is seen more epochs than another.
  Loading θ₀ in ``task_start`` changes the model outside the loop's optimiser step; it is done only to
  restore this reference point, never to move the model anywhere else. Cost: a CPU copy of the base
  weights (2 bytes/parameter in bf16: 16 GB for an 8B model).
- ``from_base: false``: continue from θ_{t-1}. Cheaper in memory, but then D_i is trained
  (T − i + 1) × epochs times in all: that is full replay, not a joint model, so it is not the default.

The method keeps nothing between tasks beyond θ₀ (re-taken from the base model on resume), so
``state_dict`` is empty: the union at task t is a function of ``ctx.sequence`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from clbench.data.encoding import Example
from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register


def union_of_tasks(ctx: TaskContext, upto: int, current: Sequence[Example]) -> list[Example]:
    """D_1 ∪ … ∪ D_{upto+1} in task order; the current task contributes ``current`` (what the loop handed over)."""
    if len(ctx.sequence) <= upto:
        raise ValueError(f"ctx.sequence has {len(ctx.sequence)} tasks; joint training at task {upto} needs every earlier task's data")
    examples: list[Example] = []
    for i in range(upto + 1):
        examples.extend(current if i == ctx.index else ctx.sequence[i][1])
    return examples


@register("joint")
class Joint(Method):
    """Multi-task fine-tuning on the union of the tasks so far (or of all tasks, at the end)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self._base: dict[str, torch.Tensor] | None = None

    def check(self, run_cfg: DictConfig) -> None:
        for key in ("cumulative", "from_base"):
            if not isinstance(self.cfg.get(key), bool):
                raise ConfigError(f"method.{key}={self.cfg.get(key)!r} must be true or false")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.cfg.from_base and self.cfg.cumulative:
            # θ₀ on the CPU: the runner calls this hook before any checkpoint is restored.
            self._base = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return model

    def _trains_now(self, ctx: TaskContext) -> bool:
        return bool(self.cfg.cumulative) or ctx.index == len(ctx.sequence) - 1

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        restore = self._base is not None and ctx.index > 0  # at task 0 the model still is θ₀
        if restore:
            ctx.model.load_state_dict(self._base, strict=True)  # only ever back to the reference point θ₀
        ctx.info.update(restored_base=restore)
        return None

    def training_examples(self, ctx: TaskContext, examples: Sequence[Example]) -> Sequence[Example]:
        if not self._trains_now(ctx):
            ctx.info.update(trained_tasks=[], trained_examples=0)
            return []
        union = union_of_tasks(ctx, ctx.index, examples)  # with cumulative=false this is the last task: all of them
        ctx.info.update(trained_tasks=[name for name, _ in ctx.sequence[: ctx.index + 1]], trained_examples=len(union))
        return union
