"""Collect finished runs and write paper-style result tables (PIECE Table 1 layout) and R-matrix heatmaps.

Usage::

    python -m clbench.report DIR [--out OUTDIR] [--group-by model benchmark [order ...]] [--no-heatmaps]

``DIR`` is searched recursively for finished run directories (``DONE`` + ``metrics.json`` + ``r_matrix.csv``,
schema in ``docs/results.md``): one run, a Hydra multirun sweep or several sweeps. Directories that look like a
run but have no ``DONE`` are unfinished and skipped (a note on stderr says how many and where).

For every group (by default one per ``(model, benchmark)``) the table has methods as rows and, as columns, the
retention scores after the last task (e.g. ``story``; HumanEval in the paper), the final-row scores ``R[T,i]``
for each task ``i``, then ``OP`` and ``BWT`` (recomputed from the R matrix with :mod:`clbench.metrics`). A first
``base`` row shows only the base model's retention scores. Cells are ``mean ± std`` over seeds (``ddof=1``;
just the mean with one seed).

Written to ``OUTDIR`` (default ``DIR/report``), every file atomically:

- ``table_<group>.md`` / ``.csv`` / ``.tex`` per group (``<group>`` = the group-by values joined by ``_``,
  e.g. ``table_stories260k_micro.md``); the CSV holds ``<col>_mean``, ``<col>_std`` and ``n_seeds``;
- ``curves_<group>.png``: OP and BWT after each task, mean over seeds per method;
- ``heatmap_<model>_<benchmark>_<method>_seed<seed>.png`` per run (also written as ``r_matrix.png`` inside the
  run directory);
- ``runs.csv``: one line per run (path, run info, OP, BWT, heatmap file).

The Markdown tables are also printed to stdout, one heading per group. Exit code 2 with a one-line message when
``DIR`` holds no finished run or a file is malformed (the message names the file).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clbench import metrics as M
from clbench.errors import DataError
from clbench.results import read_r_matrix, write_bytes_atomic, write_text_atomic

__all__ = [
    "DEFAULT_GROUP_BY",
    "METHOD_ORDER",
    "ReportError",
    "RunResult",
    "build_numeric_table",
    "build_table",
    "collect_runs",
    "load_run",
    "main",
    "plot_r_matrix",
    "to_latex",
    "to_markdown",
    "write_report",
]

DEFAULT_GROUP_BY: tuple[str, ...] = ("model", "benchmark")

#: Row order of the paper's Table 1 (names normalised: lower case, ``-`` → ``_``). Methods not listed go after
#: the listed non-PIECE methods (in order of first appearance); PIECE methods always come last.
METHOD_ORDER: tuple[str, ...] = (
    "seqft",
    "ewc",
    "gem",
    "lwf",
    "replay",
    "replay_online",
    "seqlora",
    "olora",
    "o_lora",
    "layernorm",
    "migu",
    "piece_f",
    "piece_s",
)

BASE_ROW = "base"
OP_COL = "OP"
BWT_COL = "BWT"

#: ``metrics.json`` and the recomputed OP/BWT must agree within this tolerance ...
AGREE_ATOL = 1e-6
#: ... plus the rounding of ``r_matrix.csv`` (4 decimals: each entry off by at most 5e-5). OP averages t entries
#: (error ≤ 5e-5); each BWT term is a difference of two entries (error ≤ 1e-4 · (t−1)/t).
_CSV_HALF_ULP = 0.5e-4

_RUN_MARKERS = ("config.yaml", "r_matrix.csv", "metrics.json", "checkpoint", "predictions", ".hydra")


class ReportError(ValueError):
    """Runs cannot be put in one table (e.g. different task orders in one group) or there is nothing to report."""


def _note(msg: str) -> None:
    print(f"clbench.report: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    """One finished run, as read from its directory."""

    path: Path
    run: dict[str, Any]  # metrics.json → run (model, method, benchmark, order, seed, ...)
    tasks: list[str]  # task names in training order
    r_matrix: np.ndarray  # rows = tasks trained (≤ T), columns = T tasks; NaN where not evaluated
    metrics: dict[str, Any]  # the whole metrics.json
    retention: dict[str, Any] = field(default_factory=dict)  # metrics.json → retention

    @property
    def method(self) -> str:
        return str(self.run.get("method"))

    @property
    def model(self) -> str:
        return str(self.run.get("model"))

    @property
    def benchmark(self) -> str:
        return str(self.run.get("benchmark"))

    @property
    def seed(self) -> Any:
        return self.run.get("seed")

    @property
    def n_trained(self) -> int:
        """Number of tasks trained (rows of the R matrix)."""
        return int(self.r_matrix.shape[0])

    @property
    def bwt_normaliser(self) -> str:
        return str(self.metrics.get("bwt_normaliser") or "t")

    @property
    def op(self) -> float:
        """OP after the last task trained, recomputed from the R matrix."""
        return M.overall_performance(self.r_matrix, self.n_trained)

    @property
    def bwt(self) -> float:
        """BWT after the last task trained, recomputed from the R matrix with the run's normaliser."""
        return M.backward_transfer(self.r_matrix, self.n_trained, self.bwt_normaliser)  # type: ignore[arg-type]

    @property
    def final_row(self) -> np.ndarray:
        """``R[T, i]`` for every task ``i`` (the last row)."""
        return self.r_matrix[-1, :]

    @property
    def base_retention(self) -> dict[str, float]:
        return dict(self.retention.get("base") or {})

    @property
    def final_retention(self) -> dict[str, float]:
        """Retention scores after the last task trained (empty when none were evaluated)."""
        after = self.retention.get("after_task") or []
        return dict(after[-1] or {}) if after else {}


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _read_metrics(path: Path, required_run_keys: Iterable[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", 1)
    if version != 1:
        raise DataError(f"{path}: unsupported schema_version {version!r} (this report reads version 1)")
    run = data.get("run")
    if not isinstance(run, dict):
        raise DataError(f"{path}: missing or invalid 'run' object (model, method, benchmark, seed, ...)")
    for key in ("method", *required_run_keys):
        if key not in run:
            raise DataError(f"{path}: 'run' has no {key!r} key (has: {sorted(run)})")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise DataError(f"{path}: 'tasks' must be a list of task names")
    for key in ("op", "bwt"):
        if not _is_number(data.get(key)):
            raise DataError(f"{path}: {key!r} must be a number, got {data.get(key)!r}")
    normaliser = data.get("bwt_normaliser") or "t"
    if normaliser not in ("t", "t-1"):
        raise DataError(f"{path}: 'bwt_normaliser' must be 't' or 't-1', got {normaliser!r}")
    retention = data.get("retention", {})
    if retention is None:
        retention = {}
    if not isinstance(retention, dict):
        raise DataError(f"{path}: 'retention' must be an object with 'base' and 'after_task'")
    base = retention.get("base") or {}
    after = retention.get("after_task") or []
    if not isinstance(base, dict) or not all(v is None or _is_number(v) for v in base.values()):
        raise DataError(f"{path}: 'retention.base' must map evaluator names to numbers")
    if not isinstance(after, list) or not all(
        isinstance(d, dict) and all(v is None or _is_number(v) for v in d.values()) for d in after
    ):
        raise DataError(f"{path}: 'retention.after_task' must be a list of objects mapping names to numbers")
    return data


def load_run(path: Path, required_run_keys: Iterable[str] = DEFAULT_GROUP_BY) -> RunResult:
    """Read one finished run directory; :class:`DataError` naming the file if a file is missing or malformed.

    Also recomputes OP/BWT from the R matrix and warns on stderr when they disagree with ``metrics.json``.
    """
    path = Path(path)
    for name in ("DONE", "metrics.json", "r_matrix.csv"):
        if not (path / name).is_file():
            raise DataError(f"{path / name}: missing (a finished run has DONE, metrics.json and r_matrix.csv)")
    metrics_path, r_path = path / "metrics.json", path / "r_matrix.csv"
    data = _read_metrics(metrics_path, required_run_keys)
    tasks, trained, mat = read_r_matrix(r_path)
    if tasks != data["tasks"]:
        raise DataError(f"{r_path}: header tasks {tasks} differ from 'tasks' {data['tasks']} in {metrics_path}")
    for t, name in enumerate(trained):
        if name != tasks[t]:
            raise DataError(f"{r_path}: row {t + 1} is for task {name!r}, expected {tasks[t]!r} (training order)")
    run = RunResult(
        path=path,
        run=dict(data["run"]),
        tasks=list(tasks),
        r_matrix=mat,
        metrics=data,
        retention=dict(data.get("retention") or {}),
    )
    try:
        op, bwt = run.op, run.bwt
    except ValueError as exc:
        raise DataError(f"{r_path}: {exc}") from exc
    t = run.n_trained
    tol_op = AGREE_ATOL + _CSV_HALF_ULP
    tol_bwt = AGREE_ATOL + 2 * _CSV_HALF_ULP
    if abs(op - data["op"]) > tol_op:
        _note(f"warning: {metrics_path}: op={data['op']} but OP_{t} recomputed from r_matrix.csv is {op:.6f}")
    if abs(bwt - data["bwt"]) > tol_bwt:
        _note(
            f"warning: {metrics_path}: bwt={data['bwt']} but BWT_{t} (normaliser {run.bwt_normaliser!r}) "
            f"recomputed from r_matrix.csv is {bwt:.6f}"
        )
    return run


def collect_runs(root: Path, required_run_keys: Iterable[str] = DEFAULT_GROUP_BY) -> list[RunResult]:
    """All finished runs under ``root`` (recursively), sorted by path.

    A directory with ``DONE`` is a finished run (its ``metrics.json`` and ``r_matrix.csv`` must be there and
    well-formed, else :class:`DataError` naming the file). A directory without ``DONE`` that holds run files
    (config.yaml, r_matrix.csv, metrics.json, checkpoint/, predictions/) is an unfinished run: skipped, with one
    note on stderr.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory")
    required_run_keys = tuple(required_run_keys)
    runs: list[RunResult] = []
    candidates: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden folders (.hydra/, .git/, ...) hold no runs; .hydra/config.yaml must not look like a run
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        entries = set(filenames) | set(dirnames) | ({".hydra"} if (here / ".hydra").is_dir() else set())
        if "DONE" in filenames:
            runs.append(load_run(here, required_run_keys))
            dirnames[:] = []  # a run's own subfolders (predictions/, checkpoint/) hold no runs
        elif any(m in entries for m in _RUN_MARKERS):
            candidates.append(here)
            dirnames[:] = [d for d in dirnames if d not in ("checkpoint", "predictions")]
    # a folder with run files above finished runs (e.g. a stray config.yaml in a sweep root) is not a run
    run_paths = [r.path for r in runs]
    unfinished = [c for c in candidates if not any(c in p.parents for p in run_paths)]
    if unfinished:
        shown = ", ".join(_rel(p, root) for p in unfinished[:10])
        more = f" and {len(unfinished) - 10} more" if len(unfinished) > 10 else ""
        _note(f"skipped {len(unfinished)} unfinished run(s) (no DONE) under {root}: {shown}{more}")
    runs.sort(key=lambda r: str(r.path))
    return runs


def _rel(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else str(root)


# -------------------------------------------------------------------------------------------------- tables


def _norm_method(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _method_rank(name: str) -> int:
    norm = _norm_method(name)
    non_piece = [m for m in METHOD_ORDER if not m.startswith("piece")]
    piece = [m for m in METHOD_ORDER if m.startswith("piece")]
    if norm in non_piece:
        return non_piece.index(norm)
    if norm.startswith("piece"):
        return len(non_piece) + 1 + (piece.index(norm) if norm in piece else len(piece))
    return len(non_piece)  # unknown methods: after the known ones, before PIECE (first appearance breaks ties)


def _fmt_value(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _group_key(run: RunResult, group_by: Sequence[str]) -> tuple[str, ...]:
    return tuple(_fmt_value(run.run.get(k)) for k in group_by)


def _group_runs(runs: Sequence[RunResult], group_by: Sequence[str]) -> dict[tuple[str, ...], list[RunResult]]:
    groups: dict[tuple[str, ...], list[RunResult]] = {}
    for r in runs:
        for k in group_by:
            if k not in r.run:
                raise DataError(f"{r.path / 'metrics.json'}: 'run' has no {k!r} key to group by")
        groups.setdefault(_group_key(r, group_by), []).append(r)
    return groups


def _describe_key(key: tuple[str, ...], group_by: Sequence[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(group_by, key))


def _check_tasks(key: tuple[str, ...], runs: list[RunResult], group_by: Sequence[str]) -> list[str]:
    tasks = runs[0].tasks
    for r in runs[1:]:
        if r.tasks != tasks:
            hint = (
                " — add 'order' to the group-by keys (--group-by ... order) to get one table per order"
                if "order" not in group_by
                else ""
            )
            raise ReportError(
                f"runs in group {_describe_key(key, group_by)} have different task orders: "
                f"{tasks} ({runs[0].path}) vs {r.tasks} ({r.path}){hint}"
            )
    return tasks


def _row_labels(runs: list[RunResult], group_by: Sequence[str]) -> list[str]:
    """Row label per run: the method, plus ``(key=value, ...)`` for run settings that vary among its runs."""
    skip = set(group_by) | {"method", "seed"}
    by_method: dict[str, list[RunResult]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    varying: dict[str, list[str]] = {}
    for method, rs in by_method.items():
        keys: list[str] = []
        for r in rs:
            for k in r.run:
                if k not in skip and k not in keys:
                    keys.append(k)
        varying[method] = [k for k in keys if len({json.dumps(r.run.get(k), sort_keys=True) for r in rs}) > 1]
    labels = []
    for r in runs:
        ks = varying[r.method]
        labels.append(r.method + (f" ({', '.join(f'{k}={_fmt_value(r.run.get(k))}' for k in ks)})" if ks else ""))
    return labels


def _row_order(runs: Sequence[RunResult], labels: Sequence[str]) -> list[str]:
    """Distinct row labels sorted by :data:`METHOD_ORDER` rank, ties by first appearance."""
    first: dict[str, int] = {}
    method_of: dict[str, str] = {}
    for n, (lab, r) in enumerate(zip(labels, runs)):
        first.setdefault(lab, n)
        method_of[lab] = r.method
    return sorted(first, key=lambda lab: (_method_rank(method_of[lab]), first[lab]))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size >= 2 else math.nan
    return mean, std


@dataclass
class _Table:
    columns: list[str]  # display columns: retention keys, tasks, OP, BWT
    retention_cols: list[str]
    rows: list[str]
    mean: pd.DataFrame
    std: pd.DataFrame
    n_seeds: pd.Series


def _retention_col(key: str, taken: set[str]) -> str:
    return key if key not in taken else f"{key} (retention)"


def _aggregate(runs: Sequence[RunResult], group_by: Sequence[str]) -> dict[tuple[str, ...], _Table]:
    group_by = tuple(group_by)
    out: dict[tuple[str, ...], _Table] = {}
    for key, rs in _group_runs(runs, group_by).items():
        tasks = _check_tasks(key, rs, group_by)
        ret_keys: list[str] = []
        for r in rs:
            for k in [*r.base_retention, *r.final_retention]:
                if k not in ret_keys:
                    ret_keys.append(k)
        taken = set(tasks) | {OP_COL, BWT_COL}
        ret_cols = [_retention_col(k, taken) for k in ret_keys]
        columns = [*ret_cols, *tasks, OP_COL, BWT_COL]

        labels = _row_labels(rs, group_by)
        order = _row_order(rs, labels)

        mean = pd.DataFrame(np.nan, index=[BASE_ROW, *order], columns=columns, dtype=float)
        std = mean.copy()
        n_seeds = pd.Series(0, index=mean.index, dtype=int)

        # base row: per seed the mean over runs (they all start from the same model), then over seeds
        per_seed: dict[str, list[RunResult]] = {}
        for r in rs:
            per_seed.setdefault(json.dumps(r.seed), []).append(r)
        for k, col in zip(ret_keys, ret_cols):
            vals = []
            for seed_runs in per_seed.values():
                v = [r.base_retention.get(k) for r in seed_runs if r.base_retention.get(k) is not None]
                vals.append(float(np.mean(v)) if v else math.nan)
            mean.loc[BASE_ROW, col], std.loc[BASE_ROW, col] = _mean_std(vals)
        n_seeds[BASE_ROW] = sum(1 for s in per_seed.values() if any(r.base_retention for r in s))

        for lab in order:
            row_runs = [r for r, rl in zip(rs, labels) if rl == lab]
            seeds = [json.dumps(r.seed) for r in row_runs]
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            if dup:
                paths = [str(r.path) for r in row_runs if json.dumps(r.seed) in dup]
                _note(f"warning: row {lab!r} has several runs with the same seed ({', '.join(dup)}): "
                      f"{paths}; all are averaged")
            cells: dict[str, list[float]] = {c: [] for c in columns}
            for r in row_runs:
                fin = r.final_retention
                for k, col in zip(ret_keys, ret_cols):
                    cells[col].append(math.nan if fin.get(k) is None else float(fin[k]))
                for i, task in enumerate(tasks):
                    cells[task].append(float(r.final_row[i]))
                cells[OP_COL].append(r.op)
                cells[BWT_COL].append(r.bwt)
            for c in columns:
                mean.loc[lab, c], std.loc[lab, c] = _mean_std(cells[c])
            n_seeds[lab] = len(row_runs)
        for frame in (mean, std):
            frame.index.name = "method"
        n_seeds.index.name = "method"
        out[key] = _Table(columns, ret_cols, [BASE_ROW, *order], mean, std, n_seeds)
    return out


def _format_cell(mean: float, std: float, decimals: int) -> str:
    if math.isnan(mean):
        return ""
    if math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _display(table: _Table, decimals: int) -> pd.DataFrame:
    df = pd.DataFrame("", index=table.mean.index, columns=table.columns, dtype=object)
    for row in table.mean.index:
        for col in table.columns:
            df.loc[row, col] = _format_cell(table.mean.loc[row, col], table.std.loc[row, col], decimals)
    return df


def _numeric(table: _Table) -> pd.DataFrame:
    data: dict[str, pd.Series] = {}
    for col in table.columns:
        data[f"{col}_mean"] = table.mean[col]
        data[f"{col}_std"] = table.std[col]
    data["n_seeds"] = table.n_seeds
    df = pd.DataFrame(data)
    df.index.name = "method"
    return df


def build_table(
    runs: Sequence[RunResult], group_by: Sequence[str] = DEFAULT_GROUP_BY, decimals: int = 2
) -> dict[tuple[str, ...], pd.DataFrame]:
    """One display table per group (key = the group-by values, e.g. ``("stories260k", "micro")``).

    Index ``method``: ``base`` first, then methods (``seqft`` first, PIECE last); columns: retention keys,
    the task names (final row ``R[T,i]``), ``OP``, ``BWT``; cells are strings ``"mean ± std"`` (just the mean
    with one seed; empty where there is no value). See :func:`build_numeric_table` for the numbers.
    Raises :class:`ReportError` when runs of one group have different task orders.
    """
    return {k: _display(t, decimals) for k, t in _aggregate(runs, group_by).items()}


def build_numeric_table(
    runs: Sequence[RunResult], group_by: Sequence[str] = DEFAULT_GROUP_BY
) -> dict[tuple[str, ...], pd.DataFrame]:
    """Like :func:`build_table` but numeric: columns ``<col>_mean``, ``<col>_std`` (NaN with one seed), ``n_seeds``."""
    return {k: _numeric(t) for k, t in _aggregate(runs, group_by).items()}


# ------------------------------------------------------------------------------------------ text renderers


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a display frame (index as the first column)."""
    header = [str(df.index.name or ""), *map(str, df.columns)]
    body = [[str(i), *(str(v) for v in row)] for i, row in zip(df.index, df.itertuples(index=False))]
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *body]]
    widths = [max(len(r[j]) for r in esc) for j in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in esc]
    sep = "| " + " | ".join(("-" * w if j == 0 else "-" * (w - 1) + ":") for j, w in enumerate(widths)) + " |"
    return "\n".join([lines[0], sep, *lines[1:]]) + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex_escape(s: str) -> str:
    s = "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)
    return s.replace("±", r"$\pm$")


def to_latex(df: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs ``tabular`` of a display frame (needs ``\\usepackage{booktabs}``); special characters escaped."""
    ncols = len(df.columns)
    lines = ["% generated by clbench.report; needs \\usepackage{booktabs}"]
    if caption:
        lines.append(f"% {caption}")
    lines.append("\\begin{tabular}{l" + "c" * ncols + "}")
    lines.append("\\toprule")
    header = ["Method", *(_tex_escape(str(c)) for c in df.columns)]
    lines.append(" & ".join(header) + " \\\\")
    lines.append("\\midrule")
    for i, (idx, row) in enumerate(zip(df.index, df.itertuples(index=False))):
        label = _tex_escape(str(idx))
        if idx == BASE_ROW:
            label = f"\\textit{{{label}}}"
        lines.append(" & ".join([label, *(_tex_escape(str(v)) for v in row)]) + " \\\\")
        if idx == BASE_ROW and i < len(df.index) - 1:
            lines.append("\\midrule")
    lines.append("\\bottomrule")
    lines.append("\\end{tabular}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- file output


def _safe_name(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(s)).strip("-.")
    return s or "none"


def render_png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _heatmap_png(run: RunResult) -> bytes:
    title = f"R matrix: {run.method} | {run.model} | {run.benchmark} | seed {_fmt_value(run.seed)}"
    return render_png(heatmap_figure(run.tasks, run.r_matrix, title))


def heatmap_figure(tasks: Sequence[str], mat: np.ndarray, title: str) -> Any:
    """An annotated 0-100 heatmap of R (rows: after task t; NaN cells blank) as a matplotlib Figure."""
    from matplotlib.figure import Figure

    n_rows, n_cols = mat.shape
    fig = Figure(figsize=(max(4.5, 0.75 * n_cols + 3), max(3.5, 0.6 * n_rows + 2)))
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for t in range(n_rows):
        for i in range(n_cols):
            v = mat[t, i]
            if not np.isnan(v):
                ax.text(i, t, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 60 else "black")
    ax.set_xticks(range(n_cols), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(n_rows), labels=[f"after task {t + 1} ({tasks[t]})" for t in range(n_rows)])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("trained")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score (0-100)")
    return fig


def plot_r_matrix(run: RunResult, path: Path | None = None) -> Path:
    """Write the R-matrix heatmap of ``run`` (default ``<run dir>/r_matrix.png``) atomically; returns the path."""
    path = Path(path) if path is not None else run.path / "r_matrix.png"
    return write_bytes_atomic(path, _heatmap_png(run))


def _curves_png(key: tuple[str, ...], runs: list[RunResult], group_by: Sequence[str]) -> bytes | None:
    """OP_t and BWT_t per method (mean ± std over seeds); ``None`` when no run has complete curves."""
    from matplotlib.figure import Figure

    labels = _row_labels(runs, group_by)
    order = _row_order(runs, labels)
    per_run: list[dict[str, list[float]] | None] = []
    for r in runs:
        try:
            per_run.append(M.curves(r.r_matrix, r.bwt_normaliser))  # type: ignore[arg-type]
        except ValueError as exc:
            _note(f"warning: no OP/BWT curve for {r.path}: {exc}")
            per_run.append(None)
    if all(c is None for c in per_run):
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = [fig.add_subplot(1, 2, j + 1) for j in range(2)]
    n_max = 1
    for k, lab in enumerate(order):
        cs = [c for c, rl in zip(per_run, labels) if rl == lab and c is not None]
        if not cs:
            continue
        for ax, name in zip(axes, ("op", "bwt")):
            n = min(len(c[name]) for c in cs)
            n_max = max(n_max, n)
            arr = np.array([c[name][:n] for c in cs])
            x = np.arange(1, n + 1)
            mean = arr.mean(axis=0)
            colour = f"C{k % 10}"
            ax.plot(x, mean, marker="o", color=colour, label=lab)
            if arr.shape[0] >= 2:
                sd = arr.std(axis=0, ddof=1)
                ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.15)
    for ax, name in zip(axes, (OP_COL, BWT_COL)):
        ax.set_xlabel("tasks learned t")
        ax.set_ylabel(name)
        ax.set_xticks(range(1, n_max + 1))
        ax.set_title(f"{name}_t ({_describe_key(key, group_by)}; mean ± std over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return render_png(fig)


def write_report(
    runs: Sequence[RunResult],
    out_dir: Path,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
    *,
    heatmaps: bool = True,
    curves: bool = True,
    decimals: int = 2,
    stdout: Any = None,
) -> list[Path]:
    """Write tables (md/csv/tex), curves, heatmaps and ``runs.csv`` to ``out_dir``; print the Markdown tables.

    Returns the paths written to ``out_dir``. ``stdout``: where the Markdown goes (default ``sys.stdout``;
    ``False`` to print nothing).
    """
    out_dir = Path(out_dir)
    group_by = tuple(group_by)
    if not runs:
        raise ReportError("no finished runs to report")
    stream = sys.stdout if stdout is None else stdout
    tables = _aggregate(runs, group_by)
    groups = _group_runs(runs, group_by)
    written: list[Path] = []

    for key, table in tables.items():
        stem = "table_" + "_".join(_safe_name(v) for v in key)
        disp = _display(table, decimals)
        desc = _describe_key(key, group_by)
        ns = table.n_seeds.drop(BASE_ROW)
        if len(set(ns)) == 1:
            n_text = f"{int(ns.iloc[0])} seed{'s' if int(ns.iloc[0]) != 1 else ''}"
        else:
            n_text = "seeds per row: " + ", ".join(f"{k}={int(v)}" for k, v in ns.items())
        caption = (
            f"{desc}. Columns: retention after the last task, R[T,i] per task, OP, BWT "
            f"(normaliser {', '.join(sorted({r.bwt_normaliser for r in groups[key]}))}); "
            f"mean ± std (ddof=1) over {n_text}."
        )
        md = f"## {desc}\n\n{caption}\n\n{to_markdown(disp)}"
        written.append(write_text_atomic(out_dir / f"{stem}.md", md))
        written.append(write_text_atomic(out_dir / f"{stem}.csv", _numeric(table).to_csv()))
        written.append(write_text_atomic(out_dir / f"{stem}.tex", to_latex(disp, caption)))
        if curves:
            cstem = "curves_" + "_".join(_safe_name(v) for v in key)
            png = _curves_png(key, groups[key], group_by)
            if png is not None:
                written.append(write_bytes_atomic(out_dir / f"{cstem}.png", png))
        if stream is not False:
            print(md, file=stream)

    index_rows = []
    used: set[str] = set()
    for r in runs:
        heat = ""
        if heatmaps:
            png = _heatmap_png(r)
            write_bytes_atomic(r.path / "r_matrix.png", png)
            base = "heatmap_" + "_".join(
                _safe_name(v) for v in (r.model, r.benchmark, r.method, f"seed{_fmt_value(r.seed)}")
            )
            name, n = base, 1
            while name in used:
                n += 1
                name = f"{base}_{n}"
            used.add(name)
            heat = f"{name}.png"
            written.append(write_bytes_atomic(out_dir / heat, png))
        index_rows.append({"path": str(r.path), **{k: r.run[k] for k in r.run}, "op": r.op, "bwt": r.bwt,
                           "heatmap": heat})
    written.append(write_text_atomic(out_dir / "runs.csv", pd.DataFrame(index_rows).to_csv(index=False)))
    return written


# ---------------------------------------------------------------------------------------------------- CLI


def _parse_group_by(values: Sequence[str]) -> tuple[str, ...]:
    keys = [k.strip() for v in values for k in v.split(",") if k.strip()]
    if not keys:
        raise ReportError("--group-by needs at least one key")
    return tuple(dict.fromkeys(keys))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clbench.report",
        description="Tables (PIECE Table 1 layout) and R-matrix heatmaps from finished clbench runs.",
    )
    parser.add_argument("dir", type=Path, help="a run directory, a multirun sweep, or a folder of sweeps")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: DIR/report)")
    parser.add_argument(
        "--group-by",
        nargs="+",
        default=list(DEFAULT_GROUP_BY),
        metavar="KEY",
        help="run keys (metrics.json → run) giving one table per value combination; default: model benchmark",
    )
    parser.add_argument("--decimals", type=int, default=2, help="decimals in the tables (default 2)")
    parser.add_argument("--no-heatmaps", action="store_true", help="do not draw the R-matrix heatmaps")
    parser.add_argument("--no-curves", action="store_true", help="do not draw the OP/BWT curves per group")
    args = parser.parse_args(argv)
    try:
        group_by = _parse_group_by(args.group_by)
        if not args.dir.is_dir():
            raise ReportError(f"{args.dir}: not a directory")
        runs = collect_runs(args.dir, group_by)
        if not runs:
            print(f"clbench.report: error: no finished runs (directories with DONE) under {args.dir}", file=sys.stderr)
            return 2
        out = args.out if args.out is not None else args.dir / "report"
        write_report(
            runs, out, group_by, heatmaps=not args.no_heatmaps, curves=not args.no_curves, decimals=args.decimals
        )
    except (DataError, ReportError) as exc:
        print(f"clbench.report: error: {exc}", file=sys.stderr)
        return 2
    _note(f"{len(runs)} run(s) reported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
