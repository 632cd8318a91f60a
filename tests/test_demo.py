"""The README's main command, reduced in size: same code path, smaller numbers."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from reid_search.app.cli import main


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    r = CliRunner().invoke(main, ["-q", "-w", str(ws), "demo", "--ids", "16", "--epochs", "1", "--max-steps", "2"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for step in ("== 1. synthetic data", "== 2. untrained", "== 3. train", "== 4. index", "== 5. eval", "== 6. query",
                 "== summary"):
        assert step in r.output
    # the schedule it trains with, the scaled pad and the untrained model's figures are printed
    assert "schedule: adam, P8xK4, lr by epoch 0: " in r.output
    assert "pad 2x2 px (10 px at 256x128, scaled)" in r.output
    assert "untrained (random init)" in r.output
    summary = json.loads((ws / "demo-summary.json").read_text())
    for key in ("trained", "trained_rerank"):
        assert 0.0 <= summary[key]["mAP"] <= 1.0 and summary[key]["num_gallery"] > 0
    assert summary["trained_rerank"]["rerank"] is True
    assert Image.open(ws / "demo-query.png").width > 64 * 8
    assert (ws / "runs" / "demo" / "model.pt").is_file()
    # a second run reuses data and model and still completes
    r = CliRunner().invoke(main, ["-q", "-w", str(ws), "demo", "--ids", "16", "--epochs", "1", "--max-steps", "2"],
                           catch_exceptions=False)
    assert r.exit_code == 0 and "reusing" in r.output


def test_demo_rejects_a_bad_override_before_touching_anything(tmp_path: Path) -> None:
    from tests.helpers import one_line_error

    ws = tmp_path / "ws"
    r = CliRunner().invoke(main, ["-w", str(ws), "demo", "-o", "bogus=1"])
    one_line_error(r, "unknown config key 'bogus'")
    assert not (ws / "demo-data").exists()
