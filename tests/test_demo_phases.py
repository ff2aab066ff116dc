"""``make demo`` prints each step's wall time beside the total (issue 17 §5: the demo's 20-minute budget)."""

from __future__ import annotations

from aligner_export.tools import demo


def test_phases_split_the_total_into_steps(monkeypatch, capsys):
    clock = iter([100.0, 101.0, 131.0, 151.0, 200.0])
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    phases = demo._Phases()  # 100
    phases.banner("1/3 models", "models")  # 101
    phases.banner("2/3 calibrate", "calibration")  # 131
    phases.banner("3/3 export", "export")  # 151
    assert phases.summary() == "100s (models 30s, calibration 20s, export 49s)"  # ends at 200
    assert "== 2/3 calibrate ==" in capsys.readouterr().out
