"""EWC: Elastic Weight Consolidation (PIECE supplementary B.1, eq. 14; Kirkpatrick et al., 2017).

While learning task t the loss is

    L = L_t(θ) + λ Σ_i F_i (θ_i − θ*_i)²                                  (PIECE eq. 14)

with θ* the parameters after the previous task, F the diagonal Fisher information and λ = 0.5 (PIECE B.1).
There is no factor 1/2 in eq. 14, so none here. The penalty is returned by ``loss_terms`` as the term
``ewc``; the loop adds it to the task loss of every micro-batch with the micro-batch's share, so each
optimiser step sees it exactly once. It is absent while learning the first task (no previous task).

F of a task is the diagonal empirical Fisher computed at the END of that task, on that task's training data,
at the end-of-task parameters: F_i = 1/|D| Σ_{(x,y)∈D} (∂ log p_θ(y|x) / ∂θ_i)², per-sample gradients of the
summed answer log-likelihood (``clbench.importance.gradient_moments`` with one example per gradient and
``fisher_diagonal``, the same estimator as PIECE eq. 4), with the model in eval mode. θ*_k is a float32 copy
of the parameters at the end of task k.

Choices where the paper is silent (config keys under ``method``):

- ``accumulate``: how the per-task Fishers F_1..F_{t−1} combine (the paper says only "after training the
  previous task").
  ``sum`` (default): F = Σ_k F_k and θ* = the end point of the latest task ("online EWC", one penalty);
  ``mean``: F = 1/(t−1) Σ_k F_k, θ* = the latest end point;
  ``separate``: one penalty per past task, Σ_k λ Σ_i F_{k,i} (θ_i − θ*_{k,i})² (Kirkpatrick et al.'s form;
  keeps two float32 copies of the trainable parameters per past task).
- ``fisher_samples``: estimate F on at most this many training examples of the task, drawn without
  replacement by a ``random.Random`` seeded from the run seed and the task index (null: all examples).
- which parameters: every parameter that is trainable (``requires_grad``) at the end of the task.

Paper-vs-code switch ``variant`` (docs/paper_vs_code.md):

- ``paper`` (default): as above.
- ``authors_code``: the TRACE-benchmark EWC that PIECE's baselines run (``model/Regular/EWC.py``). Its F is
  never reset: after every optimiser step it adds g²/n, g the raw gradient of that step's batch (task loss
  plus penalty, NaNs zeroed) and n the number of steps per epoch, summed over every epoch of every task seen
  so far, the current one included; the penalty is 0.5·λ Σ_i F_i (θ_i − θ*_i)² with θ* the end point of the
  previous task, and the code's λ is 400 (set ``lambda_ewc=400`` to reproduce it). The squared gradients are
  read through the ``edit_gradients`` hook, which sees every step's gradients before masking and clipping
  and returns ``None`` (no edit). That hook sees one gradient per optimiser step (the mean over the step's
  micro-batches); the code squares each micro-batch's gradient of loss/accumulation_steps and divides by the
  number of micro-batches per epoch, so the two agree exactly when ``trainer.micro_batch_size`` equals
  ``trainer.batch_size``. ``accumulate`` must stay ``sum`` and ``fisher_samples`` null there.

State for resuming (``state_dict``): the combined or per-task Fishers, the anchors θ* and the number of
finished tasks, as float32 CPU tensors; they are moved to the parameters' devices at the next task start.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from clbench import importance
from clbench.data.encoding import Example
from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register

Tensors = dict[str, torch.Tensor]

ACCUMULATE = ("sum", "mean", "separate")
VARIANTS = ("paper", "authors_code")


@dataclass
class Penalty:
    """One quadratic penalty ``scale · Σ_i F_i (θ_i − θ*_i)²``."""

    fisher: Tensors
    anchor: Tensors
    scale: float

    def value(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # float32 whatever the model's dtype: the squared differences are tiny and bf16 would round them away
        return self.scale * sum((f * (params[n].float() - self.anchor[n]).pow(2)).sum() for n, f in self.fisher.items())


def ewc_penalty(penalties: Sequence[Penalty], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ over penalties of scale · Σ_i F_i (θ_i − θ*_i)²."""
    return sum(p.value(params) for p in penalties)  # type: ignore[return-value]


def _snapshot(tensors: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> Tensors:
    return {n: t.detach().to(device=device, dtype=torch.float32).clone() for n, t in tensors.items()}


@register("ewc")
class EWC(Method):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.tasks_done = 0
        # sum / mean / authors_code: one running Fisher sum and the latest anchor
        self.fisher_sum: Tensors | None = None
        self.anchor: Tensors | None = None
        # separate: one (F_k, θ*_k) per finished task
        self.per_task: list[dict[str, Tensors]] = []
        self.steps_per_epoch = 1  # authors_code: the code divides each step's g² by the number of batches

    # ---- configuration -------------------------------------------------------------------------------

    def check(self, run_cfg: DictConfig) -> None:
        c = self.cfg
        if not isinstance(c.lambda_ewc, (int, float)) or isinstance(c.lambda_ewc, bool) or c.lambda_ewc < 0:
            raise ConfigError(f"method.lambda_ewc={c.lambda_ewc!r} must be a number ≥ 0")
        if c.accumulate not in ACCUMULATE:
            raise ConfigError(f"method.accumulate={c.accumulate!r} must be one of {list(ACCUMULATE)}")
        if c.variant not in VARIANTS:
            raise ConfigError(f"method.variant={c.variant!r} must be one of {list(VARIANTS)}")
        if c.fisher_samples is not None and (not isinstance(c.fisher_samples, int) or isinstance(c.fisher_samples, bool) or c.fisher_samples < 1):
            raise ConfigError(f"method.fisher_samples={c.fisher_samples!r} must be a positive integer or null")
        if c.variant == "authors_code" and c.accumulate != "sum":
            raise ConfigError(f"method.accumulate={c.accumulate!r}: variant=authors_code keeps one never-reset Fisher sum; use accumulate=sum")
        if c.variant == "authors_code" and c.fisher_samples is not None:
            raise ConfigError("method.fisher_samples applies only to variant=paper (authors_code uses the training steps' gradients)")

    @property
    def coefficient(self) -> float:
        """λ of eq. 14; the authors' code multiplies its penalty by 0.5·λ."""
        return float(self.cfg.lambda_ewc) * (0.5 if self.cfg.variant == "authors_code" else 1.0)

    # ---- hooks ---------------------------------------------------------------------------------------

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        self._move_to(ctx.model)
        if self.cfg.variant == "authors_code":
            if ctx.settings is None:
                raise ValueError("EWC variant=authors_code needs ctx.settings (the batch size)")
            self.steps_per_epoch = max(1, -(-len(ctx.train) // ctx.settings.batch_size))
        return None  # every trainable parameter trains

    def penalties(self) -> list[Penalty]:
        """The penalties active now (none before the first task has finished)."""
        if self.cfg.accumulate == "separate":
            return [Penalty(p["fisher"], p["anchor"], self.coefficient) for p in self.per_task]
        if self.anchor is None or self.fisher_sum is None:
            return []
        scale = self.coefficient / self.tasks_done if self.cfg.accumulate == "mean" else self.coefficient
        return [Penalty(self.fisher_sum, self.anchor, scale)]

    def loss_terms(self, ctx: TaskContext, model: nn.Module, batch: Mapping[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        active = self.penalties()
        if not active:
            return {}
        return {"ewc": ewc_penalty(active, dict(model.named_parameters()))}

    def edit_gradients(self, ctx: TaskContext, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if self.cfg.variant != "authors_code":
            return None
        if self.fisher_sum is None:
            self.fisher_sum = {n: torch.zeros_like(g, dtype=torch.float32) for n, g in grads.items()}
        for n, g in grads.items():
            if n not in self.fisher_sum:
                self.fisher_sum[n] = torch.zeros_like(g, dtype=torch.float32)
            self.fisher_sum[n] += torch.nan_to_num(g.detach().float(), nan=0.0).pow(2) / self.steps_per_epoch
        return None  # statistics only: the step uses the gradients unchanged

    def task_end(self, ctx: TaskContext) -> None:
        trainable = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        anchor = _snapshot(trainable)
        self.tasks_done += 1
        if self.cfg.variant == "authors_code":
            self.anchor = anchor
            ctx.info["ewc_fisher_total"] = _total(self.fisher_sum or {})
            return
        fisher = self.task_fisher(ctx, list(trainable))
        ctx.info["ewc_fisher_total"] = _total(fisher)
        if self.cfg.accumulate == "separate":
            self.per_task.append({"fisher": fisher, "anchor": anchor})
            return
        if self.fisher_sum is None:
            self.fisher_sum = fisher
        else:
            for n, f in fisher.items():
                self.fisher_sum[n] = self.fisher_sum[n] + f if n in self.fisher_sum else f
        self.anchor = anchor

    def task_fisher(self, ctx: TaskContext, names: list[str]) -> Tensors:
        """Diagonal empirical Fisher of the task at the current parameters (per-sample squared gradients)."""
        moments = importance.gradient_moments(
            ctx.model, ctx.tokenizer, self.fisher_examples(ctx), names, ctx.policy, micro_batch_size=1, progress=ctx.progress
        )
        return importance.fisher_diagonal(moments)

    def fisher_examples(self, ctx: TaskContext) -> Sequence[Example]:
        examples = list(ctx.train)
        n = self.cfg.fisher_samples
        if n is None or n >= len(examples):
            return examples
        rng = random.Random(ctx.seed * 1000 + ctx.index)  # own RNG: the global streams stay untouched
        return [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]

    # ---- resuming ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks_done": self.tasks_done,
            "fisher_sum": None if self.fisher_sum is None else _snapshot(self.fisher_sum, "cpu"),
            "anchor": None if self.anchor is None else _snapshot(self.anchor, "cpu"),
            "per_task": [{k: _snapshot(v, "cpu") for k, v in p.items()} for p in self.per_task],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tasks_done = int(state["tasks_done"])
        self.fisher_sum = None if state["fisher_sum"] is None else dict(state["fisher_sum"])
        self.anchor = None if state["anchor"] is None else dict(state["anchor"])
        self.per_task = [dict(p) for p in state["per_task"]]

    def _move_to(self, model: nn.Module) -> None:
        """Put every stored tensor next to its parameter (restored state is on the CPU)."""
        devices = {n: p.device for n, p in model.named_parameters()}

        def move(ts: Tensors | None) -> Tensors | None:
            return None if ts is None else {n: t.to(devices.get(n, t.device)) for n, t in ts.items()}

        self.fisher_sum = move(self.fisher_sum)
        self.anchor = move(self.anchor)
        self.per_task = [{k: move(v) for k, v in p.items()} for p in self.per_task]  # type: ignore[misc]


def _total(tensors: Mapping[str, torch.Tensor]) -> float:
    return float(sum(float(t.sum()) for t in tensors.values()))
