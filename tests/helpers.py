"""Shared helpers for the end-to-end tests: compose the real Hydra config tree."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from clbench.run import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# A run small enough for a unit test: tiny random Llama, 3 micro tasks, 1 epoch, few examples.
TINY_RUN = [
    "model=tiny_llama",
    "benchmark=micro",
    "benchmark.order=[mood,color,legs]",
    "benchmark.train_samples=24",
    "benchmark.test_samples=6",
    "trainer.epochs=1",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=4",
    "progress=false",
]


def compose_config(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        extra = [f"run_dir={run_dir}"] if run_dir is not None else ["run_dir=unused"]
        return compose(config_name="config", overrides=[*overrides, *extra])
