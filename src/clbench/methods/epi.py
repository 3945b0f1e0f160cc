"""EPI: Evolving Parameter Isolation (epi.md §2.3–2.5, Algorithm 1 in Appendix D; setup §3.3).

Every optimiser step t (Alg. 1, lines 4–6), with g_t the raw gradient of the step's batch:

    S_t = β·S_{t−1} + (1−β)·g_t⊙g_t                                       (eq. 5, S_0 = 0)

Every H steps (t ≡ 0 mod H, lines 8–11), layer-wise min–max normalisation and a global top-p mask:

    μ_{t,l} = min_{k∈Ω_l} S_t^(k),  ν_{t,l} = max_{k∈Ω_l} S_t^(k)          (eq. 7)
    Î_t^(j) = (S_t^(j) − μ_{t,l}) / (ν_{t,l} − μ_{t,l} + ε)               (eq. 8)
    m_t^(j) = 𝕀(Î_t^(j) ≥ ρ_t(p)),  ρ_t(p) the (1−p)-quantile of Î_t        (eq. 9)

otherwise m_t = m_{t−1} (line 13); m_0 = 0, so nothing is protected before the first refresh. The update of
step t is θ_t = θ_{t−1} + (1 − m_t) ⊙ ΔAdamW (eq. 13, line 17): a protected entry does not move at all,
decoupled weight decay included. m_t is computed from S_t, which already holds g_t, and it applies to the
update of that same step t (the order of Alg. 1).

How the hooks carry this out: ``edit_gradients`` sees every step's raw gradients (before masking or
clipping), updates S with ``clbench.importance.ema_squared_gradients``, counts the step and returns ``None``
(no edit). ``refresh_selection`` runs next, in the same step: at t ≡ 0 mod H it returns the new selection =
every eligible tensor with a BoolTensor of its NON-protected entries. The class sets
``changes_selection_during_task`` and ``masks_gradients = False``: AdamW's moments see the full g_t (eq. 12)
and the loop restores every unselected entry after each AdamW step — that is eq. 13's masking of the update. Defaults (``conf/method/epi.yaml``): p = 1% and H = 500 (§3.3), β = 0.99
(Table 4).

Choices where the paper is silent (config keys under ``method``):

- ``reset_between_tasks`` (default ``false``): EPI is defined for SFT on a data stream; the paper's own
  experiments are "sequential multi-stage SFT" (§3), and Alg. 1 runs once over all T steps with one S, one
  mask and one step counter (§4.6: the mask "reconfigures immediately following task transitions", which
  needs S and m to live across tasks). So by default S, the protected mask and the global step counter carry
  over from task to task: a task starts with the mask the previous task ended with (applied from its very
  first step), and refreshes happen at global steps H, 2H, … of the whole sequence. ``true`` restarts Alg. 1
  for each task (S = 0, m = 0, t = 0). The loop's fresh AdamW per task is a loop choice (PIECE §4.1).
- ``normalise`` (default ``layer``): "layer" in eqs. 7–8 is a transformer layer (block): Ω_l is "the set of
  parameters in the l-th layer", Fig. 4 and Table 12 are about layer *depth* ("Layers 1–8" of a 32-layer
  model). Tensors are grouped by the block index matched by ``layer_pattern`` and each group is min–max
  normalised as a whole (``clbench.importance.minmax_normalise(group, "global")``); a tensor outside every
  block (e.g. the final norm) is its own group. ``tensor`` normalises each parameter tensor alone
  (``minmax_normalise(S, "tensor")``); ``none`` ranks raw S globally (the "Global Raw Scores" ablation,
  Table 3, and "EPI w/o Layer Norm", Table 2).
- ``epsilon`` (default 0): ε of eq. 8 has no value in the paper. Squared gradients of a large model can be
  far below any fixed ε (1e-12 is common), and ε then shrinks whole layers' scores towards 0 and decides the
  global ranking; ε = 0 is eq. 8's limit, and a constant layer maps to 0 (``minmax_normalise``).
- Budget: exactly k = ⌊p·N⌋ entries are protected, N = number of eligible entries (``top_k_mask``, ties
  broken by position). Eq. 9's "Î ≥ quantile" would protect every entry tied with the threshold too.
- ``eligible`` (default: all parameters but embeddings / LM head, as PIECE and the other methods here):
  which tensors S is kept for and may be protected. ``ineligible``: ``frozen`` (default: the other tensors do
  not train, as in every selection method here) or ``train`` (they train with nothing protected, closer to
  the paper, where all of θ trains and any of it may be protected).
- A step whose gradient lacks an eligible tensor (unused parameter) counts as g = 0 for it: S decays.

Mask dynamics (Appendix E.2, Tables 11–12), recorded at every refresh: the Jaccard overlap of the protected
set with the run's FIRST mask, |S_lock| and |S_free| of eqs. 10–11 (against the mask in force before the
refresh), and the flips since the previous refresh per group "<layer>/<attention|mlp|norm|other>" and per
layer (flipped entries, entries, flipped/entries; the paper does not say what its flip rate divides by, so
the counts are kept). The history is part of ``state_dict``, written to ``<run>/method_files/mask_history.json``
at each task end, and summarised in ``ctx.info`` (``metrics.json`` → ``task_info``).

Paper versus this code: EPI has no public code, so there is no ``variant`` switch; the ablations of the paper
are config values (``normalise=none``; ``beta=0`` for "No EMA", Table 4). One deviation comes from the shared
loop: it multiplies the gradients of protected entries by 0 before AdamW steps, so their Adam moments decay
while protected, whereas Alg. 1 line 16 computes AdamWStep with the full g_t and masks only the update. The
protected entries stay bit-identical either way; entries released later restart with smaller moments here.

State for resuming: S (float32), the protected mask, the first mask, the previous refresh's mask, the global
step counter and the history, all CPU tensors or plain lists/dicts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from clbench import importance
from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register
from clbench.results import write_json_atomic

Tensors = dict[str, torch.Tensor]

NORMALISE = ("layer", "tensor", "none")
INELIGIBLE = ("frozen", "train")
# Component of a tensor for the flip-rate groups; first match wins, so norms come first
# ("post_attention_layernorm" is a norm, not attention).
COMPONENTS = (("norm", re.compile(r"norm|\bln")), ("attention", re.compile(r"attn|attention")), ("mlp", re.compile(r"mlp|feed_forward|ffn")))


def layer_index(name: str, pattern: re.Pattern[str]) -> str | None:
    """The transformer-block index in a parameter name (``model.layers.3.mlp...`` → ``"3"``), if any."""
    found = pattern.search(name)
    return found.group(1) if found else None


def component(name: str) -> str:
    for label, regex in COMPONENTS:
        if regex.search(name):
            return label
    return "other"


def normalisation_groups(names: Iterable[str], scope: str, pattern: re.Pattern[str]) -> list[list[str]]:
    """The sets Ω_l of eqs. 7–8: tensors of one transformer layer together (``layer``) or each tensor alone."""
    groups: dict[str, list[str]] = {}
    for name in names:
        index = layer_index(name, pattern) if scope == "layer" else None
        groups.setdefault(f"layer {index}" if index is not None else name, []).append(name)
    return list(groups.values())


def layerwise_minmax(scores: Mapping[str, torch.Tensor], scope: str, pattern: re.Pattern[str], epsilon: float = 0.0) -> Tensors:
    """Eqs. 7–8: (S − μ_l) / (ν_l − μ_l + ε) within each group Ω_l; ``scope="none"`` returns S unchanged."""
    if scope == "none":
        return {n: s.float() for n, s in scores.items()}
    out: Tensors = {}
    for group in normalisation_groups(scores, scope, pattern):
        sub = {n: scores[n] for n in group}
        normalised = importance.minmax_normalise(sub, "global")  # min/max over the whole group Ω_l
        if epsilon > 0:
            span = max(float(s.max()) for s in sub.values()) - min(float(s.min()) for s in sub.values())
            scale = span / (span + epsilon)  # (S−μ)/(ν−μ) · (ν−μ)/(ν−μ+ε) = eq. 8 with ε
            normalised = {n: v * scale for n, v in normalised.items()}
        out.update(normalised)
    return out


def jaccard(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| of two protected sets given as per-tensor bool masks (1.0 when both are empty)."""
    inter = sum(int((a[n].cpu() & b[n].cpu()).sum()) for n in a)
    union = sum(int((a[n].cpu() | b[n].cpu()).sum()) for n in a)
    return 1.0 if union == 0 else inter / union


def flip_counts(previous: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], pattern: re.Pattern[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Entries whose protection changed between two masks, per "<layer>/<component>" group and per layer.

    Returns ``{"by_group": {key: {"flipped", "entries", "rate"}}, "by_layer": {...}}``; tensors outside any
    transformer layer have layer ``"none"``.
    """
    by_group: dict[str, list[int]] = {}
    by_layer: dict[str, list[int]] = {}
    for name, cur in current.items():
        flipped = int((cur.cpu() ^ previous[name].cpu()).sum())
        layer = layer_index(name, pattern) or "none"
        for table, key in ((by_group, f"{layer}/{component(name)}"), (by_layer, layer)):
            counts = table.setdefault(key, [0, 0])
            counts[0] += flipped
            counts[1] += cur.numel()

    def rates(table: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
        return {k: {"flipped": f, "entries": e, "rate": f / e} for k, (f, e) in sorted(table.items(), key=lambda kv: _layer_sort_key(kv[0]))}

    return {"by_group": rates(by_group), "by_layer": rates(by_layer)}


def _layer_sort_key(key: str) -> tuple[int, str]:
    head = key.split("/", 1)[0]
    return (int(head), key) if head.isdigit() else (1 << 30, key)


def _count(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


@register("epi")
class EPI(Method):
    changes_selection_during_task = True
    masks_gradients = False  # eqs. 12–13: AdamW sees the full g_t; only the update of protected entries is undone

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.ema: Tensors | None = None  # S_t per eligible tensor
        self.protected: Tensors | None = None  # m_t (True = protected); None = m_0 = 0
        self.first_mask: Tensors | None = None  # the run's first refreshed mask (Jaccard of Table 11)
        self.last_refresh_mask: Tensors | None = None  # the previous refresh's mask (flip rates of Table 12)
        self.step = 0  # t of Alg. 1 (global over the sequence unless reset_between_tasks)
        self.history: list[dict[str, Any]] = []
        self._names: list[str] = []
        self._ineligible: list[str] = []
        self._apply_carried = False
        self._warned = False
        self._task_refreshes = 0

    # -- configuration -------------------------------------------------------------------------------------

    def check(self, run_cfg: DictConfig) -> None:
        cfg = self.cfg
        if not 0 < cfg.ratio <= 1:
            raise ConfigError(f"method.ratio={cfg.ratio} must be in (0, 1] (the protected fraction p)")
        if not 0 <= cfg.beta < 1:
            raise ConfigError(f"method.beta={cfg.beta} must be in [0, 1) (EMA factor of eq. 5)")
        if not isinstance(cfg.refresh_every, int) or isinstance(cfg.refresh_every, bool) or cfg.refresh_every < 1:
            raise ConfigError(f"method.refresh_every={cfg.refresh_every} must be an integer ≥ 1 (the interval H)")
        if cfg.normalise not in NORMALISE:
            raise ConfigError(f"method.normalise={cfg.normalise!r} must be one of {list(NORMALISE)}")
        if not cfg.epsilon >= 0:
            raise ConfigError(f"method.epsilon={cfg.epsilon} must be ≥ 0 (ε of eq. 8)")
        if cfg.ineligible not in INELIGIBLE:
            raise ConfigError(f"method.ineligible={cfg.ineligible!r} must be one of {list(INELIGIBLE)}")
        if not isinstance(cfg.reset_between_tasks, bool):
            raise ConfigError(f"method.reset_between_tasks={cfg.reset_between_tasks!r} must be true or false")
        try:
            pattern = re.compile(cfg.layer_pattern)
        except re.error as exc:
            raise ConfigError(f"method.layer_pattern={cfg.layer_pattern!r} is not a regular expression: {exc}") from exc
        if pattern.groups < 1:
            raise ConfigError(f"method.layer_pattern={cfg.layer_pattern!r} needs one group capturing the layer index")

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.cfg.layer_pattern)

    # -- hooks ---------------------------------------------------------------------------------------------

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        eligible = importance.eligible_parameters(ctx.model, self.cfg.eligible.include, self.cfg.eligible.exclude)
        self._names = list(eligible)
        self._ineligible = [n for n, p in ctx.model.named_parameters() if n not in eligible and p.requires_grad]
        if self.cfg.reset_between_tasks:
            self.ema, self.protected, self.step = None, None, 0
        if self.ema is None:
            self.ema = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in eligible.items()}
        self.ema = {n: self.ema[n].to(p.device) for n, p in eligible.items()}
        if self.protected is not None:
            self.protected = {n: self.protected[n].to(p.device) for n, p in eligible.items()}
        # A carried-over mask is applied by refresh_selection at the task's first step: a task-start mask with
        # no True entry would drop its tensor from the optimiser, and a later refresh could not release it.
        self._apply_carried = self.protected is not None and _count(self.protected) > 0
        self._task_refreshes = 0
        self._warn_if_no_refresh(ctx)
        selection: dict[str, torch.Tensor | None] = {n: None for n in self._names}  # m_0 = 0: all trainable
        return selection | self._ineligible_selection()

    def edit_gradients(self, ctx: TaskContext, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Alg. 1 line 6 / eq. 5 on the step's raw gradients; nothing is edited."""
        assert self.ema is not None
        present = {n: grads[n] for n in self._names if n in grads}
        updated = importance.ema_squared_gradients(self.ema, present, float(self.cfg.beta))
        for n in self._names:
            if n not in updated:  # no gradient reached this tensor: g = 0
                updated[n] = float(self.cfg.beta) * self.ema[n]
        self.ema = updated
        self.step += 1
        return None

    def refresh_selection(self, ctx: TaskContext, step: int) -> ParameterSelection:
        """Alg. 1 lines 8–13: a new protected mask at t ≡ 0 (mod H), else the previous one."""
        if self.step % int(self.cfg.refresh_every) == 0:
            self._apply_carried = False
            self._refresh(ctx, step)
            return self._selection()
        if self._apply_carried:
            self._apply_carried = False
            return self._selection()
        return None

    def task_end(self, ctx: TaskContext) -> None:
        last = self.history[-1] if self.history else None
        ctx.info.update(
            eligible=sum(e.numel() for e in self.ema.values()) if self.ema else 0,
            protected=_count(self.protected) if self.protected is not None else 0,
            refreshes=self._task_refreshes,
            refreshes_total=len(self.history),
            global_step=self.step,
            jaccard_first=last["jaccard_first"] if last else None,
            flip_rate=last["flip_rate"] if last else None,
        )
        if ctx.work_dir is not None:
            write_json_atomic(ctx.work_dir / "mask_history.json", self._history_document())

    def state_dict(self) -> dict[str, Any]:
        def cpu(tensors: Tensors | None) -> Tensors | None:
            return None if tensors is None else {n: t.detach().cpu().clone() for n, t in tensors.items()}

        return {
            "ema": cpu(self.ema),
            "protected": cpu(self.protected),
            "first_mask": cpu(self.first_mask),
            "last_refresh_mask": cpu(self.last_refresh_mask),
            "step": self.step,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema = state["ema"]
        self.protected = state["protected"]
        self.first_mask = state["first_mask"]
        self.last_refresh_mask = state["last_refresh_mask"]
        self.step = int(state["step"])
        self.history = [dict(h) for h in state["history"]]

    # -- internals -----------------------------------------------------------------------------------------

    def protection_mask(self) -> Tensors:
        """Eqs. 7–9 on the current S: exactly ⌊p·N⌋ entries with the largest normalised score."""
        assert self.ema is not None
        scores = layerwise_minmax(self.ema, self.cfg.normalise, self.pattern, float(self.cfg.epsilon))
        k = importance.budget(float(self.cfg.ratio), sum(s.numel() for s in scores.values()))
        return importance.top_k_mask(scores, k)

    def _refresh(self, ctx: TaskContext, loop_step: int) -> None:
        new = {n: m.to(self.ema[n].device) for n, m in self.protection_mask().items()}
        before = self.protected if self.protected is not None else {n: torch.zeros_like(m) for n, m in new.items()}
        new_cpu = {n: m.cpu() for n, m in new.items()}
        if self.first_mask is None:
            self.first_mask = new_cpu
        record: dict[str, Any] = {
            "refresh": len(self.history),
            "step": self.step,
            "task_index": ctx.index,
            "task": ctx.name,
            "task_step": loop_step + 1,
            "protected": _count(new),
            "locked": sum(int((new[n] & ~before[n]).sum()) for n in new),  # eq. 10
            "freed": sum(int((~new[n] & before[n]).sum()) for n in new),  # eq. 11
            "jaccard_first": jaccard(self.first_mask, new_cpu),
            "flip_rate": None,
            "flips": None,
        }
        if self.last_refresh_mask is not None:
            flips = flip_counts(self.last_refresh_mask, new_cpu, self.pattern)
            total = sum(v["flipped"] for v in flips["by_layer"].values())
            record["flip_rate"] = total / sum(v["entries"] for v in flips["by_layer"].values())
            record["flips"] = flips
        self.history.append(record)
        self.protected = new
        self.last_refresh_mask = new_cpu
        self._task_refreshes += 1

    def _selection(self) -> dict[str, torch.Tensor | None]:
        """Every eligible tensor with a mask of its NON-protected entries (1 − m_t of eq. 13)."""
        assert self.protected is not None
        selection: dict[str, torch.Tensor | None] = {n: ~self.protected[n] for n in self._names}
        return selection | self._ineligible_selection()

    def _ineligible_selection(self) -> dict[str, torch.Tensor | None]:
        return {n: None for n in self._ineligible} if self.cfg.ineligible == "train" else {}

    def _warn_if_no_refresh(self, ctx: TaskContext) -> None:
        if self._warned or ctx.settings is None:
            return
        steps = math.ceil(len(ctx.train) / ctx.settings.batch_size) * ctx.settings.epochs
        every = int(self.cfg.refresh_every)
        if every > steps:
            counted = "restarts each task" if self.cfg.reset_between_tasks else "counts steps over the whole sequence"
            print(
                f"[clbench] warning: method.refresh_every={every} exceeds the {steps} optimiser steps of task {ctx.name!r} "
                f"(the step counter {counted}); for the micro suite set e.g. method.refresh_every=10"
            )
            self._warned = True

    def _history_document(self) -> dict[str, Any]:
        keys = ("ratio", "beta", "refresh_every", "normalise", "epsilon", "reset_between_tasks")
        return {
            "method": "epi",
            "settings": {k: self.cfg[k] for k in keys},
            "step": self.step,
            "eligible": sum(e.numel() for e in self.ema.values()) if self.ema else 0,
            "refreshes": self.history,
        }
