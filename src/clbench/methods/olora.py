"""O-LoRA: a new LoRA adapter per task, kept apart from the old ones (PIECE supplementary B.3, eqs. 22–23;
Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

Task t trains a fresh adapter (A_t, B_t) (A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, r = 8, α = 32, dropout 0.1 on
q_proj and v_proj, as SeqLoRA) with the task loss plus the orthogonality regulariser of eq. 22,

    L_ortho = γ · Σ_{j<t} ‖A_tᵀ A_j‖²_F        (γ = 0.5, summed over every adapted layer),

while the adapters of past tasks and the base weights stay fixed. At test time W = W₀ + Σ_t (α/r) B_t A_t
(eq. 23, with eq. 21's scaling).

Implementation: one PEFT adapter, re-initialised at every task start. At task end its update
(α/r)·B_t A_t is added to the base weight of its layer and B_t is set to zero, so the model *is*
W₀ + Σ_{s≤t} (α/r) B_s A_s (eq. 23) at every evaluation; A_t (the only thing eq. 22 needs of a past task)
is kept in the method's state. Folding keeps the model's structure fixed (base weights + one r-rank
adapter) whatever the number of tasks, so the runner's strict ``load_state_dict`` of a checkpoint restores
the folded base weights, the checkpoint's ``method.state_dict()`` restores the past A's, and generation is
a plain forward of one PEFT model. Past adapters cannot move while task t trains: they are no longer
parameters, and the masking component trains only the current A and B.

Choices where the paper is silent (config keys under ``method``):

- ``ortho_product`` (default ``AAt``; the paper is inconsistent here): eq. 22 as printed, with PIECE's
  shapes (A ∈ R^{r×d_in}), is ‖A_tᵀA_j‖²_F, a d_in×d_in product (``AtA``). It equals ⟨A_tA_tᵀ, A_jA_jᵀ⟩_F (computed that way: r×r Gram matrices),
  which is > 0 for any two full-rank adapters: it shrinks A_t rather than making row spaces orthogonal.
  ‖A_tᵀA_j‖_F is *not* ‖A_jA_tᵀ‖_F in general (r = 1: ‖a bᵀ‖_F = |a||b| but |a·b| for the other).
  ``AAt`` uses ‖A_tA_jᵀ‖²_F (r×r, zero exactly when the row spaces of A_t and A_j are orthogonal), the
  orthogonality that O-LoRA's paper means, that PIECE's text states ("enforcing orthogonality between the
  LoRA subspaces") and that its code computes: the default.
- Re-initialisation of each new adapter: PEFT's default (A Kaiming-uniform, B = 0) from a generator
  seeded from the run seed and the task index.
- Train mode during the task so LoRA dropout acts (see ``seqlora.py``).
- Folding is done in float32 and cast to the base weight's dtype (bf16 models round the folded update).

Paper-vs-code switches (O-LoRA's public code):

- ``variant: authors_code``: the regulariser is γ·Σ_j Σ|A_j A_tᵀ| (sum of absolute entries of the r×r
  product, not a squared Frobenius norm); ``ortho_product`` must then be ``AAt`` (or null).
- ``lambda2``: the code adds λ2·Σ(‖A_t‖_F + ‖B_t‖_F) over every adapted layer (λ2 = 0 in its scripts and
  here; the paper has no such term).
- The code stacks past adapters (rank grows by r per task) instead of folding them into W₀; the model it
  evaluates is the same function W₀ + Σ_t (α/r) B_t A_t, so there is no switch for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register
from clbench.methods.seqlora import (
    ADAPTER,
    adapter_generator,
    check_lora_config,
    init_adapter_,
    lora_layers,
    lora_selection,
    wrap_with_lora,
)


def ortho_penalty(a_new: torch.Tensor, past: torch.Tensor, product: str, form: str) -> torch.Tensor:
    """Σ_j of one layer's eq. 22 term (without γ); ``past`` stacks the past A_j row-wise ((r·t) × d_in).

    - ``AtA`` / squared: Σ_j ‖A_tᵀA_j‖²_F = Σ_j ⟨A_tA_tᵀ, A_jA_jᵀ⟩_F (never forms the d_in×d_in products);
    - ``AAt`` / squared: Σ_j ‖A_tA_jᵀ‖²_F = ‖A_t Pᵀ‖²_F with P the stacked past A's;
    - ``AAt`` / abs: Σ_j Σ|A_jA_tᵀ| = Σ|P A_tᵀ| (O-LoRA's code).
    """
    a_new = a_new.float()
    past = past.to(device=a_new.device, dtype=torch.float32)
    if form == "abs":
        return (past @ a_new.T).abs().sum()
    if product == "AAt":
        return (a_new @ past.T).pow(2).sum()
    rank = a_new.shape[0]
    grams = past.view(-1, rank, past.shape[1])  # (t, r, d_in)
    past_gram = torch.einsum("tkd,tld->kl", grams, grams)  # Σ_j A_j A_jᵀ
    return ((a_new @ a_new.T) * past_gram).sum()


@torch.no_grad()
def fold_adapter_(layer: LoraLayer) -> torch.Tensor:
    """W₀ ← W₀ + (α/r)·B A in float32, then B ← 0 (the layer's function is unchanged); returns A (CPU copy)."""
    a = layer.lora_A[ADAPTER].weight
    b = layer.lora_B[ADAPTER].weight
    delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
    if layer.fan_in_fan_out:  # GPT-2 style Conv1D stores W transposed
        delta = delta.T
    base = layer.get_base_layer().weight
    base.copy_((base.float() + delta).to(base.dtype))
    b.zero_()
    return a.detach().to("cpu", copy=True)


@register("olora")
class OLoRA(Method):
    """A new LoRA per task with the orthogonality penalty; past adapters folded into the base weights."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.past_a: dict[str, list[torch.Tensor]] = {}  # layer name -> [A_0, ..., A_{t-1}] (CPU)
        self.tasks_folded = 0
        self._stacked: dict[str, torch.Tensor] = {}  # layer name -> past A's stacked on the model's device

    def check(self, run_cfg: DictConfig) -> None:
        check_lora_config(self.cfg, run_cfg)
        for key in ("lambda1", "lambda2"):
            value = self.cfg[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"method.{key}={value!r} must be a number ≥ 0")
        if self.cfg.variant not in ("paper", "authors_code"):
            raise ConfigError(f"method.variant={self.cfg.variant!r} must be 'paper' or 'authors_code'")
        if self.cfg.ortho_product not in (None, "AtA", "AAt"):
            raise ConfigError(f"method.ortho_product={self.cfg.ortho_product!r} must be 'AtA', 'AAt' or null")
        if self.cfg.variant == "authors_code" and self.cfg.ortho_product == "AtA":
            raise ConfigError("method.ortho_product='AtA' is not available with method.variant='authors_code' (the code uses A_j A_tᵀ)")

    @property
    def ortho_product(self) -> str:
        if self.cfg.ortho_product is not None:
            return self.cfg.ortho_product
        return "AtA" if self.cfg.variant == "paper" else "AAt"

    @property
    def ortho_form(self) -> str:
        return "squared" if self.cfg.variant == "paper" else "abs"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return wrap_with_lora(model, self.cfg)

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        if self.tasks_folded != ctx.index:
            raise RuntimeError(f"O-LoRA holds {self.tasks_folded} past adapters but task index is {ctx.index}: method state out of step")
        init_adapter_(ctx.model, adapter_generator(ctx.seed, ctx.index))
        device = next(ctx.model.parameters()).device
        self._stacked = {name: torch.cat(a_list).to(device) for name, a_list in self.past_a.items() if a_list}
        ctx.model.train()  # LoRA dropout (PIECE B.3: 0.1) only acts in train mode
        return lora_selection(ctx.model)

    def loss_terms(self, ctx: TaskContext, model: nn.Module, batch: Mapping[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        layers = lora_layers(model)
        if self._stacked and self.cfg.lambda1 > 0:
            penalty = sum(
                ortho_penalty(layers[name].lora_A[ADAPTER].weight, past, self.ortho_product, self.ortho_form)
                for name, past in self._stacked.items()
            )
            terms["orthogonal"] = self.cfg.lambda1 * penalty
        if self.cfg.lambda2 > 0:
            norms = sum(
                torch.linalg.vector_norm(layer.lora_A[ADAPTER].weight.float()) + torch.linalg.vector_norm(layer.lora_B[ADAPTER].weight.float())
                for layer in layers.values()
            )
            terms["l2"] = self.cfg.lambda2 * norms
        return terms

    def task_end(self, ctx: TaskContext) -> None:
        for name, layer in lora_layers(ctx.model).items():
            self.past_a.setdefault(name, []).append(fold_adapter_(layer))
        self.tasks_folded += 1
        self._stacked = {}
        ctx.info["olora_past_adapters"] = self.tasks_folded

    def state_dict(self) -> dict[str, Any]:
        return {"past_a": {name: list(a_list) for name, a_list in self.past_a.items()}, "tasks_folded": self.tasks_folded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.past_a = {name: [a.cpu() for a in a_list] for name, a_list in state["past_a"].items()}
        self.tasks_folded = int(state["tasks_folded"])
        self._stacked = {}
