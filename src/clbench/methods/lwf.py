"""LwF: Learning without Forgetting (PIECE supplementary B.1, eqs. 17–19; Li & Hoiem, 2017).

While learning task t the loss is

    L_LwF = L_t^CE + α · L_KD                                               (PIECE eq. 17)
    L_KD  = − Σ_c p_c^old(T) log p_c^new(T)                                  (eq. 18)
    p_c(T) = exp(z_c / T) / Σ_j exp(z_j / T)                                 (eq. 19)

with α = 0.5 and T = 2 (PIECE B.1). "old" is a frozen copy of the model as it was when the current task
started (θ_{t−1}), "new" the model being trained; both see the SAME batch of the current task's inputs,
the teacher in eval mode under ``no_grad`` on the same device (a second full copy of the model in memory for
the length of the task, freed at task end). The classes c are the vocabulary.

How the equations map onto the loop:

- Eq. 17 weights the task loss by 1 (not 1 − α), which is what the loop already does, so the method returns
  only ``{"distill": α · L_KD}``; no reweighting of the task loss is needed and the sum is exactly eq. 17.
- Eq. 18 has no T² factor, so ``t_squared: false`` is the default (Hinton et al.'s T² scaling: ``true``).
- Eq. 18 is a cross-entropy. It differs from KL(p^old ‖ p^new) by the teacher's entropy, which does not
  depend on θ: both give the same gradients. ``kd_form: cross_entropy`` (default) returns eq. 18's value,
  ``kl`` the KL divergence (0 when student = teacher, nicer to log).

Choices where the paper is silent (config keys under ``method``):

- ``positions``: which token positions are distilled, averaged with equal weight over the micro-batch.
  ``answer`` (default): the positions whose logits predict an answer token (logits[:, j] with
  labels[:, j+1] ≠ −100, the terminator included) — exactly the positions the task loss is computed on.
  ``sequence``: every position that predicts a non-padding token (prompt and answer).
- ``distill_first_task``: whether task 1 is distilled from the base (pre-trained) model, the model "before
  the current task" there. Default ``true``: PIECE tracks capability retention of the base model (HumanEval),
  which needs a teacher on task 1 too; the TRACE-benchmark code distils only from task 2 on (``false``).

Resuming: the teacher is the model at task start, i.e. the model of the checkpoint written after the
previous task. On resume the runner restores those weights before ``task_start`` is called, so the teacher
is rebuilt from them and nothing needs to be stored (``state_dict`` is empty).

Not reproduced from the TRACE-benchmark code (``model/Regular/LwF.py``), which PIECE's baselines run: it
stores the teacher's logits per step index in one pass and reads them back by step index in the next task's
epochs under a shuffling sampler, so teacher and student logits belong to different examples; it computes
``kl_div(log_softmax(old/T), softmax(new/T))`` = KL(p^new ‖ p^old), the reverse direction; it sums over
every position (prompt and padding included) divided by the batch size, with weight 1 instead of α and no
distillation on the first task. Only the last point has a switch (``distill_first_task=false``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from clbench.data.encoding import IGNORE_INDEX
from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register

KD_FORMS = ("cross_entropy", "kl")
POSITIONS = ("answer", "sequence")


def distilled_positions(batch: Mapping[str, torch.Tensor], positions: str) -> torch.Tensor:
    """Boolean ``[batch, length − 1]``: which logits (predicting the next token) are distilled."""
    if positions == "answer":
        return batch["labels"][:, 1:] != IGNORE_INDEX
    return batch["attention_mask"][:, 1:].bool()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float, form: str = "cross_entropy"
) -> torch.Tensor:
    """Mean over the masked positions of −Σ_c p_c^old(T) log p_c^new(T) (eq. 18), or of KL(p^old ‖ p^new).

    Logits are ``[batch, length, vocab]``; the last position predicts nothing and is dropped, so ``mask`` is
    ``[batch, length − 1]``. Computed in float32 whatever the model's dtype.
    """
    student = student_logits[:, :-1][mask].float() / temperature
    if student.shape[0] == 0:  # no distilled position (cannot happen with answer tokens; kept safe)
        return student_logits.sum() * 0.0
    teacher = teacher_logits[:, :-1][mask].float() / temperature
    log_p_new = F.log_softmax(student, dim=-1)
    log_p_old = F.log_softmax(teacher, dim=-1)
    p_old = log_p_old.exp()
    per_position = -(p_old * log_p_new).sum(-1)
    if form == "kl":
        per_position = per_position + (p_old * log_p_old).sum(-1)  # minus the teacher's entropy
    return per_position.mean()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy on the same device, in eval mode (no dropout), with no parameter requiring a gradient."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@register("lwf")
class LwF(Method):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.teacher: nn.Module | None = None

    def check(self, run_cfg: DictConfig) -> None:
        c = self.cfg
        if not _is_number(c.alpha) or c.alpha < 0:
            raise ConfigError(f"method.alpha={c.alpha!r} must be a number ≥ 0")
        if not _is_number(c.temperature) or c.temperature <= 0:
            raise ConfigError(f"method.temperature={c.temperature!r} must be a number > 0")
        if c.kd_form not in KD_FORMS:
            raise ConfigError(f"method.kd_form={c.kd_form!r} must be one of {list(KD_FORMS)}")
        if c.positions not in POSITIONS:
            raise ConfigError(f"method.positions={c.positions!r} must be one of {list(POSITIONS)}")
        for key in ("t_squared", "distill_first_task"):
            if not isinstance(c[key], bool):
                raise ConfigError(f"method.{key}={c[key]!r} must be true or false")

    @property
    def weight(self) -> float:
        """α of eq. 17, times T² when ``t_squared``."""
        t = float(self.cfg.temperature)
        return float(self.cfg.alpha) * (t * t if self.cfg.t_squared else 1.0)

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        # the model now is θ_{t−1} (on resume: just restored from the previous task's checkpoint)
        self.teacher = frozen_copy(ctx.model) if ctx.index > 0 or self.cfg.distill_first_task else None
        return None

    def loss_terms(self, ctx: TaskContext, model: nn.Module, batch: Mapping[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = distilled_positions(batch, self.cfg.positions)
        kd = distillation_loss(outputs.logits, teacher_logits, mask, float(self.cfg.temperature), self.cfg.kd_form)
        return {"distill": self.weight * kd}

    def task_end(self, ctx: TaskContext) -> None:
        self.teacher = None  # free the copy before evaluation; the next task takes a fresh one


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
