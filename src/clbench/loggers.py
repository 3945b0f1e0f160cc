"""Experiment loggers: ``none`` (files only) and ``wandb`` (offline unless the user asks for online).

The result files in the run directory are the source of truth; a logger only mirrors them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from clbench.errors import ConfigError


class NullLogger:
    def log(self, values: dict[str, float]) -> None:
        pass

    def log_r_matrix(self, tasks: Sequence[str], rows: Sequence[Sequence[float | None]]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """Logs losses, per-task scores, the R matrix (table + heatmap) and summary metrics to wandb."""

    def __init__(self, cfg: DictConfig, run_cfg: DictConfig, run_dir: Path, run_name: str) -> None:
        import wandb

        # Offline by default so runs work without network; `logger.mode=online` (or WANDB_MODE) overrides.
        mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        self._wandb = wandb
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            group=cfg.group,
            dir=str(run_dir),
            mode=mode,
            config=OmegaConf.to_container(run_cfg, resolve=True),  # type: ignore[arg-type]
            reinit="finish_previous",
        )

    def log(self, values: dict[str, float]) -> None:
        self._run.log(values)

    def log_r_matrix(self, tasks: Sequence[str], rows: Sequence[Sequence[float | None]]) -> None:
        table = self._wandb.Table(columns=["trained_task", *tasks], data=[[tasks[t], *row] for t, row in enumerate(rows)])
        from PIL import Image

        from clbench.report import heatmap_figure, render_png

        heat = np.array([[v if v is not None else np.nan for v in row] for row in rows], dtype=float)
        png = render_png(heatmap_figure(tasks, heat, f"R matrix after task {len(rows)}"))
        self._run.log({"r_matrix/table": table, "r_matrix/heatmap": self._wandb.Image(Image.open(io.BytesIO(png)))})

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self._run.summary[k] = v

    def finish(self) -> None:
        self._run.finish()


def build_logger(cfg: DictConfig, run_cfg: DictConfig, run_dir: Path, run_name: str) -> NullLogger:
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, run_cfg, run_dir, run_name)
    raise ConfigError(f"logger.name={cfg.name!r} must be 'none' or 'wandb'")
