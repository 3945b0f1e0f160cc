import csv
import math
from pathlib import Path

import numpy as np
import pytest

from clbench import metrics

R = [
    [80.0, None, None],
    [60.0, 70.0, None],
    [50.0, 65.0, 90.0],
]


def test_op_bwt_ap_by_hand():
    # OP_3 = (50 + 65 + 90) / 3
    assert metrics.overall_performance(R, 3) == pytest.approx(205 / 3)
    # BWT_3 = ((50-80) + (65-70)) / 3  (PIECE eq. 27 divides by t)
    assert metrics.backward_transfer(R, 3) == pytest.approx(-35 / 3)
    assert metrics.backward_transfer(R, 3, normaliser="t-1") == pytest.approx(-35 / 2)
    assert metrics.backward_transfer(R, 1) == 0.0
    # AP_3 = (80 + 70 + 90) / 3
    assert metrics.average_performance(R, 3) == pytest.approx(80.0)
    assert metrics.overall_performance(R, 2) == pytest.approx(65.0)
    assert metrics.backward_transfer(R, 2) == pytest.approx(-10.0)


def test_curves_and_errors():
    c = metrics.curves(R)
    assert c["op"] == pytest.approx([80.0, 65.0, 205 / 3])
    assert c["bwt"] == pytest.approx([0.0, -10.0, -35 / 3])
    with pytest.raises(ValueError, match="t must be"):
        metrics.overall_performance(R, 4)
    with pytest.raises(ValueError, match="unevaluated"):
        metrics.overall_performance([[1.0, None], [None, 2.0]], 2)


def test_forward_transfer_needs_upper_diagonal():
    full = [[80.0, 20.0, 5.0], [60.0, 70.0, 15.0], [50.0, 65.0, 90.0]]
    # FWT_3 = ((R[1,2] - b_2) + (R[2,3] - b_3)) / 2 = ((20-10) + (15-5)) / 2
    assert metrics.forward_transfer(full, 3, [0.0, 10.0, 5.0]) == pytest.approx(10.0)
    assert metrics.forward_transfer(R, 3, [0.0, 10.0, 5.0]) is None


PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper_tables" / "piece_table1_trace.csv"
# Rows whose printed OP is not the mean of their printed final-row scores (paper typos).
INCONSISTENT = {("Gemma2-2B", "LwF"), ("Qwen3-14B", "MIGU"), ("Qwen3-14B", "PIECE-F (ours)")}


@pytest.mark.skipif(not PAPER.exists(), reason="paper tables not available")
def test_reproduces_piece_table1_op():
    tasks = ["cst", "fom", "mee", "sin", "ngc", "ngd", "20m", "py150"]
    with PAPER.open() as f:
        rows = [r for r in csv.DictReader(f) if r["op"]]
    assert len(rows) == 36
    for row in rows:
        final = [float(row[t]) for t in tasks]
        # Only the final row is published: earlier rows are unknown (NaN) and OP_T needs none of them.
        r = np.full((8, 8), np.nan)
        r[7] = final
        op = metrics.overall_performance(r, 8)
        if (row["model"], row["method"]) in INCONSISTENT:
            assert abs(op - float(row["op"])) > 1.0
        else:
            assert op == pytest.approx(float(row["op"]), abs=0.0065), row
            assert not math.isnan(op)
