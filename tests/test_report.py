"""Tests of clbench.report on fake run directories written with the schema of docs/results.md."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clbench import metrics as M
from clbench.errors import DataError
from clbench.report import (
    ReportError,
    build_numeric_table,
    build_table,
    collect_runs,
    load_run,
    main,
    write_report,
)

NAN = math.nan
TASKS = ["task_a", "task_b", "task_c"]

# R matrices (rows = after task t), with hand-computed OP_3 / BWT_3 (normaliser "t"):
R_SEQFT_1 = [[80, NAN, NAN], [60, 70, NAN], [50, 55, 90]]  # OP 65,       BWT ((50-80)+(55-70))/3 = -15
R_SEQFT_2 = [[82, NAN, NAN], [58, 74, NAN], [40, 65, 84]]  # OP 63,       BWT ((40-82)+(65-74))/3 = -17
R_PIECE_1 = [[80, NAN, NAN], [78, 70, NAN], [76, 68, 88]]  # OP 232/3,    BWT ((76-80)+(68-70))/3 = -2
R_PIECE_2 = [[84, NAN, NAN], [80, 72, NAN], [78, 70, 86]]  # OP 78,       BWT ((78-84)+(70-72))/3 = -8/3


def write_run(
    path: Path,
    r: list[list[float]],
    *,
    method: str,
    seed: int,
    model: str = "tiny",
    benchmark: str = "micro",
    order: str = "default",
    tasks: list[str] = TASKS,
    base_story: float = 83.0,
    final_story: float = 50.0,
    normaliser: str = "t",
    op: float | None = None,
    done: bool = True,
) -> Path:
    """Write r_matrix.csv, metrics.json (and DONE) like a finished clbench run."""
    path.mkdir(parents=True, exist_ok=True)
    arr = np.array(r, dtype=float)
    lines = ["trained_task," + ",".join(tasks)]
    for t, row in enumerate(arr):
        cells = ["" if np.isnan(v) else f"{v:.4f}" for v in row]
        lines.append(",".join([tasks[t], *cells]))
    (path / "r_matrix.csv").write_text("\n".join(lines) + "\n")
    cur = M.curves(arr, normaliser)
    T = arr.shape[0]
    after = [{"story": final_story + (T - 1 - t) * 5.0} for t in range(T)]  # the last one is final_story
    metrics = {
        "schema_version": 1,
        "run": {"model": model, "method": method, "benchmark": benchmark, "order": order, "seed": seed,
                "sparsity": 0.05 if method.startswith("piece") else None, "protocol": "piece"},
        "tasks": tasks,
        "op": cur["op"][-1] if op is None else op,
        "bwt": cur["bwt"][-1],
        "ap": cur["ap"][-1],
        "fwt": None,
        "curves": cur,
        "retention": {"base": {"story": base_story}, "after_task": after},
        "bwt_normaliser": normaliser,
    }
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (path / "config.yaml").write_text(f"method:\n  name: {method}\nseed: {seed}\n")
    (path / ".hydra").mkdir(exist_ok=True)
    (path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    if done:
        (path / "DONE").write_text("")
    return path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """Two sweeps: PIECE-S (sorted first on disk) and SeqFT, 2 seeds each, plus one unfinished run."""
    r = tmp_path / "multirun"
    a, b = r / "2025-01-01" / "10-00-00", r / "2025-01-02" / "10-00-00"
    (a / "multirun.yaml").parent.mkdir(parents=True)
    (a / "multirun.yaml").write_text("{}\n")
    write_run(a / "0", R_PIECE_1, method="piece_s", seed=1, base_story=83.0, final_story=70.0)
    write_run(a / "1", R_PIECE_2, method="piece_s", seed=2, base_story=85.0, final_story=72.0)
    write_run(b / "0", R_SEQFT_1, method="seqft", seed=1, base_story=83.0, final_story=40.0)
    write_run(b / "1", R_SEQFT_2, method="seqft", seed=2, base_story=85.0, final_story=44.0)
    unfinished = write_run(b / "2", R_SEQFT_1[:2], method="seqft", seed=3, done=False)
    (unfinished / "metrics.json").unlink()
    (unfinished / "checkpoint").mkdir()
    return r


def test_collect_runs_skips_unfinished(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = collect_runs(root)
    err = capsys.readouterr().err
    assert len(runs) == 4
    assert {(r.method, r.seed) for r in runs} == {("seqft", 1), ("seqft", 2), ("piece_s", 1), ("piece_s", 2)}
    assert "skipped 1 unfinished run" in err
    assert os.path.join("2025-01-02", "10-00-00", "2") in err
    run = next(r for r in runs if r.method == "seqft" and r.seed == 1)
    assert run.tasks == TASKS
    assert run.r_matrix.shape == (3, 3) and np.isnan(run.r_matrix[0, 1])
    assert run.op == pytest.approx(65.0) and run.bwt == pytest.approx(-15.0)
    assert run.run["model"] == "tiny" and run.retention["base"] == {"story": 83.0}
    assert "warning" not in err


def test_table_mean_std_by_hand(root: Path) -> None:
    tables = build_table(collect_runs(root))
    assert list(tables) == [("tiny", "micro")]
    df = tables[("tiny", "micro")]
    assert list(df.index) == ["base", "seqft", "piece_s"]  # seqft first, PIECE last
    assert list(df.columns) == ["story", "task_a", "task_b", "task_c", "OP", "BWT"]
    s2 = math.sqrt(2)  # std (ddof=1) of two values d apart is d/sqrt(2)
    assert df.loc["base", "story"] == f"84.00 ± {2 / s2:.2f}"  # 83, 85
    assert (df.loc["base", ["task_a", "task_b", "task_c", "OP", "BWT"]] == "").all()
    assert df.loc["seqft", "story"] == f"42.00 ± {4 / s2:.2f}"  # 40, 44
    assert df.loc["seqft", "task_a"] == "45.00 ± 7.07"  # 50, 40
    assert df.loc["seqft", "task_b"] == "60.00 ± 7.07"  # 55, 65
    assert df.loc["seqft", "task_c"] == "87.00 ± 4.24"  # 90, 84
    assert df.loc["seqft", "OP"] == "64.00 ± 1.41"  # 65, 63
    assert df.loc["seqft", "BWT"] == "-16.00 ± 1.41"  # -15, -17
    assert df.loc["piece_s", "OP"] == f"{(232 / 3 + 78) / 2:.2f} ± {abs(232 / 3 - 78) / s2:.2f}"
    assert df.loc["piece_s", "BWT"] == f"{(-2 - 8 / 3) / 2:.2f} ± {(8 / 3 - 2) / s2:.2f}"

    num = build_numeric_table(collect_runs(root))[("tiny", "micro")]
    assert num.loc["seqft", "OP_mean"] == pytest.approx(64.0)
    assert num.loc["seqft", "OP_std"] == pytest.approx(2 / s2)
    assert num.loc["piece_s", "task_a_mean"] == pytest.approx(77.0)
    assert num.loc["piece_s", "task_a_std"] == pytest.approx(2 / s2)
    assert num.loc["base", "story_mean"] == pytest.approx(84.0)
    assert math.isnan(num.loc["base", "OP_mean"])
    assert list(num["n_seeds"]) == [2, 2, 2]
    assert list(num.columns[:4]) == ["story_mean", "story_std", "task_a_mean", "task_a_std"]


def test_one_seed_shows_mean_only(tmp_path: Path) -> None:
    write_run(tmp_path / "r", R_SEQFT_1, method="seqft", seed=1, final_story=40.0)
    df = build_table(collect_runs(tmp_path))[("tiny", "micro")]
    assert df.loc["seqft", "OP"] == "65.00"
    assert df.loc["seqft", "BWT"] == "-15.00"
    assert df.loc["base", "story"] == "83.00"
    num = build_numeric_table(collect_runs(tmp_path))[("tiny", "micro")]
    assert math.isnan(num.loc["seqft", "OP_std"]) and num.loc["seqft", "n_seeds"] == 1


def test_bwt_normaliser_t_minus_1(tmp_path: Path) -> None:
    write_run(tmp_path / "r", R_SEQFT_1, method="seqft", seed=1, normaliser="t-1")
    (run,) = collect_runs(tmp_path)
    assert run.bwt == pytest.approx(-45 / 2)


def test_write_report_files(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    runs = collect_runs(root)
    written = write_report(runs, out, stdout=False)
    names = {p.name for p in out.iterdir()}
    expected = {
        "table_tiny_micro.md", "table_tiny_micro.csv", "table_tiny_micro.tex", "curves_tiny_micro.png", "runs.csv",
        "heatmap_tiny_micro_seqft_seed1.png", "heatmap_tiny_micro_seqft_seed2.png",
        "heatmap_tiny_micro_piece_s_seed1.png", "heatmap_tiny_micro_piece_s_seed2.png",
    }
    assert names == expected  # nothing else, in particular no leftover temp files
    assert {p.name for p in written} == expected
    for r in runs:
        png = r.path / "r_matrix.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.read_bytes() == (out / f"heatmap_tiny_micro_{r.method}_seed{r.seed}.png").read_bytes()
    assert not (root / "2025-01-02" / "10-00-00" / "2" / "r_matrix.png").exists()  # unfinished: untouched

    csv = pd.read_csv(out / "table_tiny_micro.csv", index_col="method")
    assert list(csv.index) == ["base", "seqft", "piece_s"]
    assert csv.loc["seqft", "BWT_mean"] == pytest.approx(-16.0)
    assert csv.loc["seqft", "BWT_std"] == pytest.approx(math.sqrt(2), abs=1e-5)
    assert csv.loc["seqft", "n_seeds"] == 2

    md = (out / "table_tiny_micro.md").read_text()
    assert md.startswith("## model=tiny, benchmark=micro")
    assert "| seqft " in md and "45.00 ± 7.07" in md

    tex = (out / "table_tiny_micro.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "task\\_a" in tex and "piece\\_s" in tex and "$\\pm$" in tex
    assert "task_a" not in tex.replace("task\\_a", "")

    index = pd.read_csv(out / "runs.csv")
    assert len(index) == 4 and set(index["heatmap"]) == {n for n in expected if n.startswith("heatmap_")}


def test_malformed_metrics_json_names_file(root: Path) -> None:
    bad = root / "2025-01-02" / "10-00-00" / "0" / "metrics.json"
    bad.write_text('{"schema_version": 1, "run": {"model": "tiny"')
    with pytest.raises(DataError, match=str(bad).replace("\\", "\\\\")):
        collect_runs(root)


def test_missing_key_is_clear_error_not_keyerror(tmp_path: Path) -> None:
    path = write_run(tmp_path / "r", R_SEQFT_1, method="seqft", seed=1)
    data = json.loads((path / "metrics.json").read_text())
    del data["run"]["benchmark"]
    (path / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"metrics\.json: 'run' has no 'benchmark'"):
        load_run(path)
    data["run"]["benchmark"] = "micro"
    del data["op"]
    (path / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"metrics\.json: 'op' must be a number"):
        load_run(path)


def test_malformed_r_matrix_names_file(tmp_path: Path) -> None:
    path = write_run(tmp_path / "r", R_SEQFT_1, method="seqft", seed=1)
    text = (path / "r_matrix.csv").read_text().replace("55.0000", "n/a")
    (path / "r_matrix.csv").write_text(text)
    with pytest.raises(DataError, match=r"r_matrix\.csv: line 4, column 'task_b': not a number"):
        load_run(path)


def test_op_disagreement_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "r", R_SEQFT_1, method="seqft", seed=1, op=64.0)
    (run,) = collect_runs(tmp_path)
    assert run.op == pytest.approx(65.0)  # recomputed, not taken from metrics.json
    err = capsys.readouterr().err
    assert "warning" in err and "op=64.0" in err and "65.000000" in err


def test_different_task_orders(tmp_path: Path) -> None:
    write_run(tmp_path / "a", R_SEQFT_1, method="seqft", seed=1)
    write_run(tmp_path / "b", R_SEQFT_2, method="seqft", seed=1, order="reverse", tasks=TASKS[::-1])
    runs = collect_runs(tmp_path)
    with pytest.raises(ReportError, match="different task orders"):
        build_table(runs)
    tables = build_table(runs, group_by=("model", "benchmark", "order"))
    assert set(tables) == {("tiny", "micro", "default"), ("tiny", "micro", "reverse")}
    assert list(tables[("tiny", "micro", "reverse")].columns) == ["story", "task_c", "task_b", "task_a", "OP", "BWT"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(
        [sys.executable, "-m", "clbench.report", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_prints_markdown(root: Path) -> None:
    proc = _cli(str(root))
    assert proc.returncode == 0, proc.stderr
    assert "## model=tiny, benchmark=micro" in proc.stdout
    lines = proc.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "story", "task_a", "task_b", "task_c", "OP", "BWT"
    ]
    seqft = next(ln for ln in lines if ln.startswith("| seqft"))
    assert [c.strip() for c in seqft.strip("|").split("|")] == [
        "seqft", "42.00 ± 2.83", "45.00 ± 7.07", "60.00 ± 7.07", "87.00 ± 4.24", "64.00 ± 1.41", "-16.00 ± 1.41"
    ]
    assert "skipped 1 unfinished run" in proc.stderr
    assert (root / "report" / "table_tiny_micro.md").is_file()
    assert (root / "report" / "heatmap_tiny_micro_piece_s_seed2.png").is_file()


def test_cli_no_finished_runs_exit_2(tmp_path: Path) -> None:
    write_run(tmp_path / "r", R_SEQFT_1, method="seqft", seed=1, done=False)
    proc = _cli(str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "no finished runs" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_main_malformed_exit_2(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = root / "2025-01-01" / "10-00-00" / "1" / "metrics.json"
    bad.write_text("[]")
    assert main([str(root)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_varying_setting_splits_rows(tmp_path: Path) -> None:
    for seed, r in ((1, R_PIECE_1), (2, R_PIECE_2)):
        p = write_run(tmp_path / f"s{seed}", r, method="piece_s", seed=seed)
        data = json.loads((p / "metrics.json").read_text())
        data["run"]["sparsity"] = 0.05 * seed
        (p / "metrics.json").write_text(json.dumps(data))
    write_run(tmp_path / "z", R_SEQFT_1, method="seqft", seed=1)
    df = build_table(collect_runs(tmp_path))[("tiny", "micro")]
    assert list(df.index) == ["base", "seqft", "piece_s (sparsity=0.05)", "piece_s (sparsity=0.1)"]
    assert df.loc["piece_s (sparsity=0.1)", "OP"] == "78.00"
