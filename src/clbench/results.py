"""Run directories: atomic result files, per-task checkpoints, resuming (schema in docs/results.md)."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clbench.errors import ConfigError, DataError

SCHEMA_VERSION = 1


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write to a temporary file beside ``path`` and rename it over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def r_matrix_csv(tasks: Sequence[str], rows: Sequence[Sequence[float | None]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trained_task", *tasks])
    for t, row in enumerate(rows):
        writer.writerow([tasks[t], *("" if v is None else f"{v:.4f}" for v in row)])
    return out.getvalue()


def read_r_matrix(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Task names, the task trained in each row, and R (NaN where not evaluated); errors name the file."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read R matrix: {exc}") from exc
    if not rows:
        raise DataError(f"{path}: empty file (expected header 'trained_task,<task_1>,...')")
    header = [h.strip() for h in rows[0]]
    if header[0] != "trained_task" or len(header) < 2:
        raise DataError(f"{path}: header must be 'trained_task,<task_1>,...,<task_T>', got {','.join(header)!r}")
    tasks = header[1:]
    if len(set(tasks)) != len(tasks):
        raise DataError(f"{path}: duplicate task names in header: {tasks}")
    body = rows[1:]
    if not body:
        raise DataError(f"{path}: no rows (a finished run has one row per task trained)")
    if len(body) > len(tasks):
        raise DataError(f"{path}: {len(body)} rows but only {len(tasks)} tasks")
    trained: list[str] = []
    mat = np.full((len(body), len(tasks)), np.nan)
    for t, row in enumerate(body):
        lineno = t + 2
        if len(row) != len(header):
            raise DataError(f"{path}: line {lineno} has {len(row)} fields, expected {len(header)}")
        trained.append(row[0].strip())
        for i, cell in enumerate(row[1:]):
            cell = cell.strip()
            if cell == "":
                continue
            try:
                mat[t, i] = float(cell)
            except ValueError:
                raise DataError(f"{path}: line {lineno}, column {tasks[i]!r}: not a number: {cell!r}") from None
    return tasks, trained, mat



@dataclass
class Progress:
    """Everything the runner has produced so far; saved with each per-task checkpoint."""

    tasks: list[str]
    r_rows: list[list[float | None]] = field(default_factory=list)
    initial_scores: list[float | None] | None = None
    retention_base: dict[str, float] = field(default_factory=dict)
    retention_after: list[dict[str, float]] = field(default_factory=list)
    retention_state: dict[str, Any] = field(default_factory=dict)
    task_info: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tasks_done(self) -> int:
        return len(self.r_rows)


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint"

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def claim(self, resolved_config: str, ignore: Sequence[str] = ("progress", "logger", "run_dir")) -> None:
        """Record the config, or check that an existing run directory was made by the same config.

        Keys under ``ignore`` do not change results (progress bars, logging, where the directory lives), so a resume may change them.
        """
        cfg_path = self.path / "config.yaml"
        if cfg_path.exists():
            old = cfg_path.read_text(encoding="utf-8")
            diff = [k for k in _changed_keys(old, resolved_config) if k.split(".")[0] not in ignore]
            if diff:
                raise ConfigError(
                    f"{self.path} holds a run with a different config (changed: {', '.join(diff)}); "
                    "choose another run directory (e.g. tag=...) rather than mixing results"
                )
            return
        write_text_atomic(cfg_path, resolved_config)

    def write_results(self, progress: Progress, metrics: dict[str, Any]) -> None:
        write_text_atomic(self.path / "r_matrix.csv", r_matrix_csv(progress.tasks, progress.r_rows))
        write_json_atomic(self.path / "metrics.json", metrics)

    def write_predictions(self, t: int, task: str, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        write_text_atomic(self.path / "predictions" / f"{t}_{task}.jsonl", text)

    def save_checkpoint(self, model: torch.nn.Module, method_state: dict[str, Any], progress: Progress) -> None:
        """Write the whole checkpoint to a fresh directory, then swap it in: a crash leaves the old one."""
        tmp = self.path / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save({"method": method_state, "rng": _rng_state()}, tmp / "state.pt")
        write_json_atomic(tmp / "progress.json", asdict(progress))
        old = self.path / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint.exists():
            self.checkpoint.rename(old)
        tmp.rename(self.checkpoint)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, model: torch.nn.Module) -> tuple[dict[str, Any], Progress] | None:
        """Restore model and RNG state; returns (method state, progress) or None when there is none."""
        if not (self.checkpoint / "progress.json").exists():
            return None
        progress = Progress(**json.loads((self.checkpoint / "progress.json").read_text(encoding="utf-8")))
        model.load_state_dict(torch.load(self.checkpoint / "model.pt", map_location=next(model.parameters()).device))
        state = torch.load(self.checkpoint / "state.pt", weights_only=False)
        _set_rng_state(state["rng"])
        return state["method"], progress

    def finish(self, keep_checkpoint: bool) -> None:
        write_text_atomic(self.path / "DONE", "")
        if not keep_checkpoint:
            shutil.rmtree(self.checkpoint, ignore_errors=True)


def _changed_keys(old: str, new: str) -> list[str]:
    from omegaconf import OmegaConf

    a, b = OmegaConf.to_container(OmegaConf.create(old)), OmegaConf.to_container(OmegaConf.create(new))

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    fa, fb = flat(a), flat(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
