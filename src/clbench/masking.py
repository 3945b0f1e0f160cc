"""The one component that restricts updates to a selected set of parameters (PIECE eq. 13 and kin).

A method chooses *which* parameters train by returning a ``ParameterSelection`` from its task-start hook:

- ``None``: every parameter trains (SeqFT);
- a mapping ``name -> None``: that whole tensor trains;
- a mapping ``name -> BoolTensor``: only the ``True`` entries of that tensor train;
- names absent from the mapping stay frozen.

``MaskedUpdate`` turns that into an optimiser parameter list and gradient masks, and guarantees that every
unselected entry is bit-identical after the optimiser step: fully frozen tensors never reach the optimiser,
gradients of partly selected tensors are multiplied by the mask (eq. 13), and when the optimiser could
still move a zero-gradient entry (decoupled weight decay), those entries are restored after the step.
A memory-saving engine (optimiser state only for the selected entries) would replace this class alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

ParameterSelection = Mapping[str, torch.Tensor | None] | None


class MaskedUpdate:
    def __init__(self, model: nn.Module, selection: ParameterSelection, restore_unselected: bool = False) -> None:
        params = dict(model.named_parameters())
        if selection is None:
            selection = {n: None for n, p in params.items() if p.requires_grad}
        unknown = sorted(set(selection) - set(params))
        if unknown:
            raise KeyError(f"selection names parameters the model does not have: {unknown[:5]}")
        self.masks: dict[str, torch.Tensor] = {}
        self.trainable: dict[str, nn.Parameter] = {}
        for name, mask in selection.items():
            if mask is not None:
                if mask.shape != params[name].shape:
                    raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, parameter {tuple(params[name].shape)}")
                if not bool(mask.any()):
                    continue
                self.masks[name] = mask.to(device=params[name].device, dtype=torch.bool)
            self.trainable[name] = params[name]
        self._frozen = {n: (p, p.requires_grad) for n, p in params.items() if n not in self.trainable}
        for p, _ in self._frozen.values():
            p.requires_grad_(False)
        self.restore_unselected = restore_unselected
        self._saved: dict[str, torch.Tensor] = {}

    def set_selection(self, selection: Mapping[str, torch.Tensor | None]) -> None:
        """Change the masks during a task (EPI's refreshes). Only tensors already handed to the optimiser
        can be selected; a tensor given an all-False mask stays in the optimiser but cannot move."""
        extra = sorted(set(selection) - set(self.trainable))
        if extra:
            raise KeyError(f"refreshed selection adds tensors that were frozen at task start: {extra[:5]}")
        if not self.restore_unselected:
            raise ValueError("mid-task selection changes need restore_unselected=True (moment estimates move masked entries)")
        masks = {}
        for name, p in self.trainable.items():
            if name not in selection:
                mask = torch.zeros_like(p, dtype=torch.bool)
            elif selection[name] is None:
                mask = torch.ones_like(p, dtype=torch.bool)
            else:
                mask = selection[name]
            masks[name] = mask.to(device=p.device, dtype=torch.bool)
        self.masks = masks

    def parameters(self) -> list[nn.Parameter]:
        return list(self.trainable.values())

    def n_selected(self) -> int:
        return sum(int(self.masks[n].sum()) if n in self.masks else p.numel() for n, p in self.trainable.items())

    def mask_gradients(self) -> None:
        """g ← g ⊙ M for every partly selected tensor (PIECE eq. 13)."""
        for name, mask in self.masks.items():
            grad = self.trainable[name].grad
            if grad is not None:
                grad.mul_(mask)

    def before_step(self) -> None:
        if self.restore_unselected:
            self._saved = {n: self.trainable[n].detach().clone() for n in self.masks}

    def after_step(self) -> None:
        for name, saved in self._saved.items():
            p = self.trainable[name]
            with torch.no_grad():
                p.copy_(torch.where(self.masks[name], p, saved))
        self._saved = {}

    def release(self) -> None:
        """Give frozen tensors back their ``requires_grad`` flag when the task ends."""
        for p, flag in self._frozen.values():
            p.requires_grad_(flag)

    def __enter__(self) -> MaskedUpdate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
