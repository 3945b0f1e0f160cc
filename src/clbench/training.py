"""The training loop. It owns the optimiser and every step; methods only return things through hooks.

One task: ``selection = method.task_start(ctx)`` → ``MaskedUpdate`` → epochs over
``method.training_examples(ctx, train)`` with loss = task loss + Σ ``method.loss_terms``, gradients edited by
``method.edit_gradients`` then masked, then the optimiser step → ``method.task_end(ctx)``.

Defaults follow PIECE §4.1: Adam (AdamW with weight decay 0), constant learning rate, no warm-up, a fresh
optimiser for every task (no moment estimates leak from one task into the next), effective batch
``batch_size`` reached by gradient accumulation over micro-batches of ``micro_batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from clbench.data.encoding import Example, collate_for_training, encode_for_training
from clbench.errors import ConfigError
from clbench.masking import MaskedUpdate
from clbench.methods.base import Method, TaskContext

StepLogger = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class TrainerSettings:
    lr: float
    epochs: int
    batch_size: int
    micro_batch_size: int
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = None
    warmup_ratio: float = 0.0

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


def trainer_settings(trainer_cfg: DictConfig, lr: float) -> TrainerSettings:
    """Validate ``conf/trainer`` values and fix the learning rate (resolved by the runner)."""
    if trainer_cfg.epochs < 1:
        raise ConfigError(f"trainer.epochs={trainer_cfg.epochs} must be ≥ 1")
    micro = trainer_cfg.micro_batch_size or trainer_cfg.batch_size
    if trainer_cfg.batch_size < 1 or micro < 1 or trainer_cfg.batch_size % micro:
        raise ConfigError(
            f"trainer.batch_size={trainer_cfg.batch_size} must be a positive multiple of trainer.micro_batch_size={micro}"
        )
    if not lr > 0:
        raise ConfigError(f"learning rate must be > 0, got {lr}")
    if not 0 <= trainer_cfg.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio={trainer_cfg.warmup_ratio} must be in [0, 1)")
    return TrainerSettings(
        lr=float(lr),
        epochs=int(trainer_cfg.epochs),
        batch_size=int(trainer_cfg.batch_size),
        micro_batch_size=int(micro),
        weight_decay=float(trainer_cfg.weight_decay),
        betas=(float(trainer_cfg.betas[0]), float(trainer_cfg.betas[1])),
        max_grad_norm=trainer_cfg.max_grad_norm,
        warmup_ratio=float(trainer_cfg.warmup_ratio),
    )


def _micro_batches(n: int, settings: TrainerSettings, generator: torch.Generator) -> list[list[int]]:
    perm = torch.randperm(n, generator=generator).tolist()
    return [perm[i : i + settings.micro_batch_size] for i in range(0, n, settings.micro_batch_size)]


def _schedule(settings: TrainerSettings, total_steps: int) -> Callable[[int], float]:
    warmup = int(settings.warmup_ratio * total_steps)
    return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0


def learn_task(
    model: nn.Module, method: Method, ctx: TaskContext, settings: TrainerSettings, log_step: StepLogger | None = None
) -> dict[str, float]:
    """Train ``model`` on ``ctx.train`` with ``method``'s hooks; returns summary numbers for the log."""
    selection = method.task_start(ctx)
    examples: Sequence[Example] = method.training_examples(ctx, ctx.train)
    encoded = [encode_for_training(ctx.tokenizer, ex, ctx.policy, where=f"task {ctx.name!r} example {i}") for i, ex in enumerate(examples)]
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.index)
    steps_per_epoch = -(-len(encoded) // settings.batch_size)
    losses: list[float] = []
    with MaskedUpdate(model, selection, restore_unselected=settings.weight_decay > 0) as update:
        optimizer = torch.optim.AdamW(update.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, steps_per_epoch * settings.epochs))
        model.train()
        step = 0
        bar = tqdm(total=steps_per_epoch * settings.epochs, desc=f"train {ctx.name}", disable=not ctx.progress, leave=False)
        for _epoch in range(settings.epochs):
            batches = _micro_batches(len(encoded), settings, generator)
            for start in range(0, len(batches), settings.accumulation):
                group = batches[start : start + settings.accumulation]
                n_in_group = sum(len(b) for b in group)
                terms_total: dict[str, float] = {}
                for idx in group:
                    batch = {k: v.to(device) for k, v in collate_for_training([encoded[i] for i in idx], ctx.tokenizer.pad_token_id).items()}
                    outputs = model(**batch)
                    terms = {"task": outputs.loss, **method.loss_terms(ctx, model, batch, outputs)}
                    # weight each micro-batch by its share of examples: the group's loss is a mean over examples
                    loss = sum(terms.values()) * (len(idx) / n_in_group)
                    loss.backward()
                    for name, value in terms.items():
                        terms_total[name] = terms_total.get(name, 0.0) + float(value.detach()) * len(idx) / n_in_group
                _apply_gradient_edits(method, ctx, update)
                update.mask_gradients()
                if settings.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(update.parameters(), settings.max_grad_norm)
                update.before_step()
                optimizer.step()
                update.after_step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(terms_total["task"])
                bar.update(1)
                bar.set_postfix(loss=f"{terms_total['task']:.3f}")
                if log_step is not None:
                    log_step({f"train/{ctx.name}/{k}": v for k, v in terms_total.items()} | {"train/step": step})
        bar.close()
        n_selected = update.n_selected()
    method.task_end(ctx)
    return {"steps": step, "final_loss": losses[-1] if losses else float("nan"), "trainable_entries": n_selected}


def _apply_gradient_edits(method: Method, ctx: TaskContext, update: MaskedUpdate) -> None:
    grads = {n: p.grad for n, p in update.trainable.items() if p.grad is not None}
    edited = method.edit_gradients(ctx, grads)
    if edited:
        for name, g in edited.items():
            update.trainable[name].grad = g
