"""SeqLoRA: one LoRA adapter shared by every task, trained task after task (PIECE supplementary B.3, eqs. 20–21).

For each targeted linear map h = Wx the weight becomes W' = W + (α/r)·B A (eqs. 20–21), with A ∈ R^{r×d_in},
B ∈ R^{d_out×r}, r = 8, α = 32, LoRA dropout 0.1, on q_proj and v_proj. The base weights W never change;
the *same* A and B keep training on task 1, 2, ... (no per-task adapters, nothing merged). The adapter is
built by ``peft.get_peft_model``; ``prepare_model`` returns the ``PeftModel``, so the runner's checkpoints
(``model.state_dict()``) hold base and LoRA tensors, and evaluation calls ``PeftModel.generate``.

Choices where the paper is silent (config keys under ``method``):

- ``target_modules``, ``r``, ``alpha``, ``dropout``: PIECE's values are the defaults; module names are
  matched as PEFT does (a name or a dotted suffix of a module name). Every listed name must match a module
  of the model (``check`` reads the model's config without loading weights where it can; otherwise
  ``prepare_model`` raises the same ``ConfigError``).
- Initialisation: PEFT's default (A Kaiming-uniform as ``nn.Linear``, B = 0, so the first forward equals
  the base model), drawn from a ``torch.Generator`` seeded from the run seed, never from global RNG.
- Train mode: the shared loop leaves the model in whatever mode evaluation left it (eval), where LoRA
  dropout does nothing; ``task_start`` switches the model to train mode so PIECE's dropout 0.1 acts.
  Set ``dropout: 0`` for no dropout.

No paper-vs-code switches: LoRA through PEFT is what the PIECE authors' baselines use.

The LoRA helpers below are shared with O-LoRA (``olora.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register

ADAPTER = "default"  # PEFT's name for the single adapter these methods use


def check_lora_config(cfg: DictConfig, run_cfg: DictConfig) -> None:
    """Validate the LoRA keys shared by SeqLoRA and O-LoRA, and that the target modules exist."""
    targets = cfg.target_modules
    if not OmegaConf.is_list(targets) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"method.target_modules={targets!r} must be a non-empty list of module names")
    if not isinstance(cfg.r, int) or isinstance(cfg.r, bool) or cfg.r < 1:
        raise ConfigError(f"method.r={cfg.r!r} must be an integer ≥ 1")
    if not isinstance(cfg.alpha, (int, float)) or not cfg.alpha > 0:
        raise ConfigError(f"method.alpha={cfg.alpha!r} must be > 0")
    if not isinstance(cfg.dropout, (int, float)) or not 0 <= cfg.dropout < 1:
        raise ConfigError(f"method.dropout={cfg.dropout!r} must be in [0, 1)")
    names = skeleton_module_names(run_cfg.model)
    if names is not None:
        require_targets(list(targets), names)


def skeleton_module_names(model_cfg: DictConfig) -> list[str] | None:
    """Module names of the configured model, built on the meta device (no weights are read or allocated).

    ``None`` when the model's config is not available offline (a hub id not in the local cache): the check
    then happens in ``prepare_model`` on the loaded model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if model_cfg.kind == "random":
            arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
            config = AutoConfig.for_model(**arch, vocab_size=arch.get("vocab_size", 32))  # type: ignore[arg-type]
        else:
            config = AutoConfig.from_pretrained(model_cfg.name_or_path, local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    return [name for name, _ in skeleton.named_modules()]


def require_targets(targets: Sequence[str], module_names: Iterable[str]) -> None:
    """Every target must name a module exactly or as a dotted suffix (PEFT's rule for a list of names)."""
    names = list(module_names)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
        raise ConfigError(f"method.target_modules: {missing} match no module of the model (module names: {leaves[:30]})")


def wrap_with_lora(model: nn.Module, cfg: DictConfig) -> PeftModel:
    """``peft.get_peft_model`` with the method's keys; PEFT freezes every base parameter."""
    require_targets(list(cfg.target_modules), (n for n, _ in model.named_modules()))
    config = LoraConfig(
        r=int(cfg.r),
        lora_alpha=float(cfg.alpha),
        lora_dropout=float(cfg.dropout),
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The PEFT LoRA layers of ``model`` by module name, in a fixed (sorted) order."""
    return dict(sorted((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)))


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter's A and B tensors, as ``model.named_parameters()`` spells them."""
    return [n for n, _ in model.named_parameters() if f".lora_A.{ADAPTER}." in n or f".lora_B.{ADAPTER}." in n]


def lora_selection(model: nn.Module) -> ParameterSelection:
    """Only the adapter trains: the masking component freezes everything else (explicitly, not via PEFT's flags)."""
    names = lora_parameter_names(model)
    if not names:
        raise RuntimeError("the model has no LoRA tensors; was it returned by prepare_model?")
    return {name: None for name in names}


@torch.no_grad()
def init_adapter_(model: nn.Module, generator: torch.Generator) -> None:
    """PEFT's default LoRA initialisation (A as ``nn.Linear``: Kaiming-uniform, a=√5; B = 0) from ``generator``.

    Drawn on the CPU and copied, so the same seed gives the same adapter on any device.
    """
    for layer in lora_layers(model).values():
        a = layer.lora_A[ADAPTER].weight
        fresh = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        a.copy_(fresh)
        layer.lora_B[ADAPTER].weight.zero_()


def adapter_generator(seed: int, task_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + task_index)


@register("seqlora")
class SeqLoRA(Method):
    """One PEFT LoRA adapter, shared by all tasks."""

    def check(self, run_cfg: DictConfig) -> None:
        check_lora_config(self.cfg, run_cfg)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return wrap_with_lora(model, self.cfg)

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        if ctx.index == 0:
            # The adapter is created once; later tasks continue from where the previous one left it.
            init_adapter_(ctx.model, adapter_generator(ctx.seed, 0))
        ctx.model.train()  # LoRA dropout (PIECE B.3: 0.1) only acts in train mode
        return lora_selection(ctx.model)
