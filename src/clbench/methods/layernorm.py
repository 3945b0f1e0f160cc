"""LayerNorm tuning (PIECE supplementary B.3, "LayerNorm."; Zhao et al., PIECE ref. [65]).

"LayerNorm [65] updates only the LayerNorm parameters while keeping all other model weights frozen."
Every task trains the normalisation parameters alone (weights and, where the model has them, biases of
LayerNorm / RMSNorm modules); every other parameter stays bit-identical (frozen tensors never reach the
optimiser, see ``clbench.masking``). There is no importance score and no state across tasks, so nothing
needs checkpointing.

Choices where the paper is silent (config keys under ``method``):

- ``norm_class_contains``: a parameter is a normalisation parameter when the module that directly owns it
  has a class name containing this string (default ``Norm``: ``LayerNorm``, ``LlamaRMSNorm``,
  ``Gemma2RMSNorm``, ``Qwen3RMSNorm``, ...). This is by module type, not by name, so it also finds norms
  whose attribute names do not say "norm" (e.g. ``ln_1`` in GPT-2) and it takes every norm of the model:
  the per-layer norms, the final norm, and the query/key norms of Qwen3 attention blocks.
- ``name_patterns``: a fallback for models whose norm classes do not contain that string: when no module
  matches by type, parameters whose name matches any of these regexes are taken instead (default
  ``[norm]``, the authors' rule). A model in which neither finds anything is refused (training nothing would
  silently evaluate the base model).
- ``select_by``: ``type`` (default: by module type, names as the fallback) or ``name`` (names only).
- The embeddings are never selected unless a norm owns them (they are not normalisation parameters).
- The paper's learning rate for this baseline is the one of the full-parameter methods (PIECE §4.1: 1e-5
  for Llama3-8B / Qwen3-14B, 5e-5 for Gemma2-2B), hence ``lr_group: full``.

Paper versus code: the PIECE authors' baseline code (``training/baselines/training/main.py``, ``CL_method ==
"Norm"``) freezes the input embeddings and every parameter whose name does not contain ``norm``. On the
paper's models (Llama3, Gemma2, Qwen3) that is the same set of tensors as selection by type;
``select_by=name`` reproduces the rule itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from omegaconf import DictConfig
from torch import nn

from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register


def norm_parameters_by_type(model: nn.Module, class_contains: str) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters owned directly by a module whose
    class name contains ``class_contains``; tied parameters appear once, under their first name."""
    known = dict(model.named_parameters())
    owned = {id(p): n for n, p in known.items()}
    names: list[str] = []
    for _, module in model.named_modules():
        if class_contains not in type(module).__name__:
            continue
        for p in module.parameters(recurse=False):  # only the norm's own weight/bias, never a child's
            name = owned.get(id(p))
            if name is not None and name not in names:
                names.append(name)
    return names


def norm_parameters_by_name(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    return [n for n, _ in model.named_parameters() if any(r.search(n) for r in compiled)]


def norm_parameters(model: nn.Module, class_contains: str, patterns: Sequence[str], select_by: str = "type") -> list[str]:
    """Normalisation parameters by module type, else (fallback) by name; ``select_by="name"``: by name only."""
    if select_by == "name":
        return norm_parameters_by_name(model, patterns)
    return norm_parameters_by_type(model, class_contains) or norm_parameters_by_name(model, patterns)


@register("layernorm")
class LayerNormTuning(Method):
    def check(self, run_cfg: DictConfig) -> None:
        if self.cfg.select_by not in ("type", "name"):
            raise ConfigError(f"method.select_by={self.cfg.select_by!r} must be 'type' or 'name'")
        if not isinstance(self.cfg.norm_class_contains, str) or not self.cfg.norm_class_contains:
            raise ConfigError(f"method.norm_class_contains={self.cfg.norm_class_contains!r} must be a non-empty string")
        for pattern in self.cfg.name_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"method.name_patterns: {pattern!r} is not a valid regex ({err})") from None

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        names = norm_parameters(ctx.model, self.cfg.norm_class_contains, list(self.cfg.name_patterns), self.cfg.select_by)
        if not names:
            raise ConfigError(
                f"no normalisation parameters found: no module class contains {self.cfg.norm_class_contains!r} "
                f"(method.norm_class_contains) and no parameter name matches method.name_patterns={list(self.cfg.name_patterns)}"
            )
        params = dict(ctx.model.named_parameters())
        ctx.info.update(trainable_tensors=len(names), selected=sum(params[n].numel() for n in names))
        return {n: None for n in names}
