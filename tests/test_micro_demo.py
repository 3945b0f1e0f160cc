"""The micro demo's claims, on the real pretrained stories260k model (slow: about a minute)."""

from __future__ import annotations

import json

import pytest
from helpers import compose_config

from clbench import runner


@pytest.mark.slow
def test_seqft_forgets_and_piece_s_keeps_more_story_retention(tmp_path):
    results = {}
    for method in ("seqft", "piece_s"):
        run_dir = tmp_path / method
        runner.run_experiment(compose_config(["experiment=micro", f"method={method}", "progress=false"], run_dir))
        results[method] = json.loads((run_dir / "metrics.json").read_text())
    seqft, piece = results["seqft"], results["piece_s"]
    base = seqft["retention"]["base"]["story"]
    assert base == pytest.approx(piece["retention"]["base"]["story"])
    assert seqft["bwt"] <= -5  # SeqFT really forgets earlier tasks
    assert seqft["retention"]["after_task"][-1]["story"] < base - 20  # and the model's own ability
    assert piece["retention"]["after_task"][-1]["story"] > seqft["retention"]["after_task"][-1]["story"] + 10
    # both really learn each task when it is trained (diagonal of R well above chance for the choice task)
    assert seqft["curves"]["ap"][0] >= 90 and piece["curves"]["ap"][0] >= 50
