"""TRACE-LF and TRACE-CS (trace.md §3.2, Algorithm 1, eqs. 3–9).

Step 1 (Alg. 1 lines 1–6): for every task T_k a short warm-start fine-tune *from the base model θ₀*
(``WarmStart(θ₀, T_k)``, one epoch by default, §5.6.2) gives θ*_k and the update Δ_k = θ*_k − θ₀ (eq. 6).
Core parameters C_k are then the top r% by

- TRACE-LF (strategy A, eqs. 3–5): score = α·norm(L2) + β·norm(Fisher), L2 = ‖Δ_k^{(i)}‖₂ (eq. 3), Fisher =
  E_x[(∂L/∂θ^{(i)})²] (eq. 4), α = β = 0.5 (§5.6.3);
- TRACE-CS (strategy B, eqs. 7–8): Spec_k^{(i)} = 1 − 1/(K−1) Σ_{j≠k} cos(Δ_k^{(i)}, Δ_j^{(i)}).

Step 2 (eq. 9, Alg. 1 lines 21–26): while training T_k only the tensors of C_k are updated, everything else is
frozen; a tensor in C_k trains even if an earlier task's core set held it (the paper's parameter reuse).

θ₀ is kept as a CPU copy of the eligible tensors taken in ``prepare_model`` (the runner calls it on the freshly
loaded model, also when resuming). Parameters outside the eligible set never train, so swapping θ₀ into the
eligible tensors reproduces the base model exactly. Everything in step 1 depends on θ₀ and T_k only, so TRACE-LF
runs it lazily at each task's start (identical to running it offline) and needs no state; TRACE-CS needs every
task's Δ before the first task, so its first ``task_start`` runs the warm start of every task in
``ctx.sequence`` and writes each Δ_j to its own file in ``ctx.work_dir`` (``trace_delta_<j>.pt``). A file
already there is reused (also on resume); cosines are computed tensor by tensor from memory-mapped files, so
the K deltas are never all in memory. ``state_dict`` records the delta files.

Choices where the paper is silent (config keys under ``method``):

- ``granularity``: ``tensor`` (default; the paper's "parameter" θ^{(i)} is a tensor: eq. 3 takes its L2 norm,
  §5.6.2 plots one score per module) or ``element`` (TRACE-LF only: per-entry |Δ| and per-entry Fisher).
- ``ratio``: r = 5% (§5.6.1); with tensors, k = max(1, ⌊r·n_tensors⌋) tensors (counting tensors, as the
  authors' code); with entries, k = max(1, ⌊r·n_entries⌋).
- normalisation of eq. 5 (paper: "we normalize both metrics"): min–max across all eligible tensors (tensor
  granularity) or across all eligible entries (element granularity), as the authors' code.
- ``fisher_at``: eq. 4 evaluates the gradient at θ_k, the warm-started model (default, also the authors'
  code); Alg. 1 line 11 writes ComputeFisher(θ₀, T_k) (``base``).
- ``fisher_reduce`` (tensor granularity): ``sum`` (default: the squared norm of the tensor's gradient, eq. 4
  read literally for a vector parameter) or ``mean`` (authors' code: the mean squared gradient).
- ``delta_norm``: ``l2`` (eq. 3, default) or ``rms`` (authors' code: ‖Δ‖₂/√numel).
- ``fisher_samples``: the expectation of eq. 4 over the first N training examples (300 in the authors' code),
  one gradient per example (``fisher_micro_batch_size``) of the summed answer log-likelihood.
- ``warmup_epochs`` (1, §5.6.2), ``probe_lr`` (null: the trainer's rate; authors' code 2e-5),
  ``probe_samples`` (null: the whole training set; a number probes on the first N examples only).
- ``eligible``: tensors that may be selected; default all but embeddings / LM head (the paper scores
  attention, MLP and norm tensors, §5.6.2).
- ``delta_dtype`` (TRACE-CS): dtype of the stored deltas (float32; bfloat16 halves the disk for big models).

Paper vs authors' code switches: ``delta_norm=rms``, ``fisher_reduce=mean``, ``ratio=0.10`` (LF; CS: 0.05–0.20),
``probe_lr=2e-5``, ``fisher_samples=300``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from clbench import importance
from clbench.errors import ConfigError
from clbench.masking import ParameterSelection
from clbench.methods.base import Method, TaskContext, register
from clbench.training import probe_fine_tune

# Methods that also choose the trainable parameters or wrap the model: a composition with them is refused.
SELECTION_METHODS = frozenset(
    {"piece_f", "piece_s", "epi", "migu", "layernorm", "seqlora", "olora", "trace_lf", "trace_cs", "static_isolation"}
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- helpers shared with static isolation


def snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A CPU copy of the named parameters (θ₀ for the warm starts)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


@contextmanager
def weights_loaded(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Give ``model`` the values in ``weights`` for the duration of the block, then restore its own values
    bit-exactly. Avoids holding a second full model only to run a probe from θ₀."""
    params = dict(model.named_parameters())
    saved = snapshot(model, list(weights))
    try:
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        yield model
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def run_probe(
    model: nn.Module,
    start: Mapping[str, torch.Tensor] | None,
    ctx: TaskContext,
    epochs: int,
    lr: float | None,
    samples: int | None,
) -> nn.Module:
    """A fully fine-tuned copy of ``model`` (with ``start`` swapped in, if given) on ``ctx.train``, or on its first
    ``samples`` examples. The loop's own steps and its per-task sampling seed make the probe reproducible."""
    probe_ctx = dataclasses.replace(ctx, train=list(ctx.train)[:samples]) if samples else ctx
    if start is None:
        return probe_fine_tune(model, probe_ctx, epochs, lr)
    with weights_loaded(model, start):
        return probe_fine_tune(model, probe_ctx, epochs, lr)


def check_probe_keys(cfg: DictConfig, epochs_key: str) -> None:
    """Shared validation of the probe settings (``<epochs_key>``, ``probe_lr``, ``probe_samples``)."""
    if int(cfg[epochs_key]) < 1:
        raise ConfigError(f"method.{epochs_key}={cfg[epochs_key]} must be ≥ 1")
    if cfg.probe_lr is not None and not float(cfg.probe_lr) > 0:
        raise ConfigError(f"method.probe_lr={cfg.probe_lr} must be > 0 or null (the trainer's rate)")
    if cfg.probe_samples is not None and int(cfg.probe_samples) < 1:
        raise ConfigError(f"method.probe_samples={cfg.probe_samples} must be ≥ 1 or null (all examples)")
    if not 0 < float(cfg.ratio) <= 1:
        raise ConfigError(f"method.ratio={cfg.ratio} must be in (0, 1]")


def n_tasks(run_cfg: DictConfig) -> int | None:
    """Number of tasks of the configured order, when it can be read from the config alone."""
    bench = run_cfg.get("benchmark")
    if bench is None or bench.get("order") is None:
        return None
    order = bench.order
    if isinstance(order, str):
        orders = bench.get("orders") or {}
        return len(orders[order]) if order in orders else None
    return len(order)


# ---------------------------------------------------------------- scores and selection (pure functions)


def lf_scores(
    deltas: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    *,
    granularity: str = "tensor",
    delta_norm: str = "l2",
    fisher_reduce: str = "sum",
    alpha: float = 0.5,
    beta: float = 0.5,
) -> dict[str, torch.Tensor]:
    """TRACE eq. 5: α·norm(L2) + β·norm(Fisher), min–max normalised across all tensors (0-dim score per tensor)
    or across all entries (one score per entry)."""
    if granularity == "tensor":
        l2 = importance.tensor_l2(deltas)
        magnitude = {n: torch.tensor(v / math.sqrt(deltas[n].numel()) if delta_norm == "rms" else v) for n, v in l2.items()}
        sensitivity = {n: fisher[n].float().sum() if fisher_reduce == "sum" else fisher[n].float().mean() for n in deltas}
    else:
        magnitude = {n: d.abs() for n, d in deltas.items()}
        sensitivity = {n: fisher[n].float() for n in deltas}
    m = importance.minmax_normalise(magnitude, scope="global")
    f = importance.minmax_normalise(sensitivity, scope="global")
    return {n: alpha * m[n] + beta * f[n] for n in deltas}


def select_top(scores: Mapping[str, torch.Tensor], ratio: float, granularity: str) -> dict[str, torch.Tensor | None]:
    """Top r% as a ``ParameterSelection``: whole tensors (name → None) or entries (name → bool mask)."""
    if granularity == "tensor":
        names = list(scores)
        k = max(1, importance.budget(ratio, len(names)))
        chosen = importance.top_k_mask({"tensors": torch.stack([scores[n].float().reshape(()) for n in names])}, k)["tensors"]
        return {n: None for n, keep in zip(names, chosen.tolist()) if keep}
    k = max(1, importance.budget(ratio, sum(s.numel() for s in scores.values())))
    masks = importance.top_k_mask(scores, k)
    return {n: m for n, m in masks.items() if m.any()}


class _AsFloat32(Mapping[str, torch.Tensor]):
    """Read-through view of a (memory-mapped) delta file: each tensor is cast to float32 only when read, so the
    cosines of eq. 7 touch one tensor per task at a time."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name].float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def specificity_from_files(paths: list[Path], task: int) -> dict[str, float]:
    """TRACE eq. 8 for task ``task`` from the delta files of all K tasks (memory-mapped, read tensor by tensor)."""
    loaded = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in paths]
    return importance.cosine_specificity([_AsFloat32(d["delta"]) for d in loaded], task)


# ---------------------------------------------------------------- the methods


class _TRACE(Method):

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self._base: dict[str, torch.Tensor] | None = None  # θ₀ of the eligible tensors, on the CPU

    def check(self, run_cfg: DictConfig) -> None:
        check_probe_keys(self.cfg, "warmup_epochs")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        eligible = importance.eligible_parameters(model, self.cfg.eligible.include, self.cfg.eligible.exclude)
        if not eligible:
            raise ConfigError("method.eligible selects no parameter of this model")
        self._base = snapshot(model, list(eligible))
        return model

    def _require_base(self) -> dict[str, torch.Tensor]:
        if self._base is None:
            raise RuntimeError(f"{self.name}: prepare_model must run before the first task (it keeps θ₀)")
        return self._base

    def _warm_start(self, ctx: TaskContext) -> nn.Module:
        """θ*_k = WarmStart(θ₀, T_k) (Alg. 1 line 4)."""
        cfg = self.cfg
        return run_probe(ctx.model, self._require_base(), ctx, int(cfg.warmup_epochs), cfg.probe_lr, cfg.probe_samples)

    def _delta(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        base = self._require_base()
        probe = self._warm_start(ctx)
        return importance.parameter_delta(dict(probe.named_parameters()), base, list(base))


@register("trace_lf")
class TRACELF(_TRACE):
    """Strategy A: L2–Fisher importance (eqs. 3–5)."""

    conflicts_with = SELECTION_METHODS - {"trace_lf"}

    def check(self, run_cfg: DictConfig) -> None:
        super().check(run_cfg)
        cfg = self.cfg
        choices = {
            "granularity": ("tensor", "element"),
            "delta_norm": ("l2", "rms"),
            "fisher_reduce": ("sum", "mean"),
            "fisher_at": ("warm_start", "base"),
        }
        for key, allowed in choices.items():
            if cfg[key] not in allowed:
                raise ConfigError(f"method.{key}={cfg[key]!r} must be one of {list(allowed)}")
        if cfg.alpha < 0 or cfg.beta < 0 or cfg.alpha + cfg.beta <= 0:
            raise ConfigError(f"method.alpha={cfg.alpha} and method.beta={cfg.beta} must be ≥ 0 and not both 0")
        if int(cfg.fisher_samples) < 1 or int(cfg.fisher_micro_batch_size) < 1:
            raise ConfigError("method.fisher_samples and method.fisher_micro_batch_size must be ≥ 1")

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        base = self._require_base()
        names = list(base)
        probe = self._warm_start(ctx)
        deltas = importance.parameter_delta(dict(probe.named_parameters()), base, names)
        fisher = self._fisher(ctx, probe, names)
        del probe
        scores = lf_scores(
            deltas,
            fisher,
            granularity=self.cfg.granularity,
            delta_norm=self.cfg.delta_norm,
            fisher_reduce=self.cfg.fisher_reduce,
            alpha=float(self.cfg.alpha),
            beta=float(self.cfg.beta),
        )
        selection = select_top(scores, float(self.cfg.ratio), self.cfg.granularity)
        ctx.info.update(core_tensors=sorted(selection), eligible_tensors=len(names))
        return selection

    def _fisher(self, ctx: TaskContext, probe: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """Eq. 4 at the warm-started model θ*_k (default) or at θ₀ (Alg. 1 line 11)."""
        examples = list(ctx.train)[: int(self.cfg.fisher_samples)]

        def moments(model: nn.Module) -> importance.GradientMoments:
            return importance.gradient_moments(
                model, ctx.tokenizer, examples, names, ctx.policy, int(self.cfg.fisher_micro_batch_size), progress=ctx.progress
            )

        if self.cfg.fisher_at == "warm_start":
            return importance.fisher_diagonal(moments(probe))
        with weights_loaded(ctx.model, self._require_base()):
            return importance.fisher_diagonal(moments(ctx.model))


@register("trace_cs")
class TRACECS(_TRACE):
    """Strategy B: cosine specificity of the warm-start updates across all tasks (eqs. 6–8)."""

    conflicts_with = SELECTION_METHODS - {"trace_cs"}

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.delta_files: dict[int, dict[str, str]] = {}  # task index -> {"task": name, "file": file name}

    def check(self, run_cfg: DictConfig) -> None:
        super().check(run_cfg)
        if self.cfg.delta_dtype not in _DTYPES:
            raise ConfigError(f"method.delta_dtype={self.cfg.delta_dtype!r} must be one of {sorted(_DTYPES)}")
        k = n_tasks(run_cfg)
        if k is not None and k < 2:
            raise ConfigError(f"method=trace_cs needs at least two tasks (benchmark.order has {k}): eq. 8 compares tasks")

    def task_start(self, ctx: TaskContext) -> ParameterSelection:
        if len(ctx.sequence) < 2:
            raise ConfigError("method=trace_cs needs at least two tasks in benchmark.order: eq. 8 compares tasks")
        paths = self._ensure_deltas(ctx)
        spec = specificity_from_files(paths, ctx.index)
        selection = select_top({n: torch.tensor(v) for n, v in spec.items()}, float(self.cfg.ratio), "tensor")
        ctx.info.update(core_tensors=sorted(selection), eligible_tensors=len(spec))
        return selection

    def _ensure_deltas(self, ctx: TaskContext) -> list[Path]:
        """Alg. 1 lines 3–6 for every task of the sequence; files already in ``work_dir`` are reused."""
        if ctx.work_dir is None:
            raise RuntimeError("trace_cs keeps the warm-start deltas in ctx.work_dir, which is not set")
        work_dir = Path(ctx.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        names = list(self._require_base())
        paths = []
        for j, (task, train) in enumerate(ctx.sequence):
            path = work_dir / f"trace_delta_{j:02d}.pt"
            if not _delta_file_matches(path, task, names):
                probe_ctx = dataclasses.replace(ctx, index=j, name=task, train=train, info={})
                self._write_delta(path, task, self._delta(probe_ctx))
            self.delta_files[j] = {"task": task, "file": path.name}
            paths.append(path)
        return paths

    def _write_delta(self, path: Path, task: str, delta: dict[str, torch.Tensor]) -> None:
        dtype = _DTYPES[self.cfg.delta_dtype]
        tmp = path.with_suffix(".tmp")
        torch.save({"task": task, "names": list(delta), "delta": {n: d.to(dtype) for n, d in delta.items()}}, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written delta behind

    def state_dict(self) -> dict[str, Any]:
        return {"delta_files": {str(j): dict(v) for j, v in self.delta_files.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # The files themselves are the state: task_start reuses every one that is present and valid and
        # recomputes (deterministically, from θ₀) one that was deleted.
        self.delta_files = {int(j): dict(v) for j, v in state.get("delta_files", {}).items()}


def _delta_file_matches(path: Path, task: str, names: list[str]) -> bool:
    if not path.exists():
        return False
    meta = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return meta.get("task") == task and meta.get("names") == names
