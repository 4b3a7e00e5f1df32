"""The benchmark's smoke run (a few scenarios, one trial, picosnitch only), so
that the harness cannot rot. The full run is `bench/run.py` (bench/README.md)."""
import os
import subprocess

from conftest import PYTHON, ROOT, need_root


def test_smoke_run_writes_a_scorecard(tmp_path):
    need_root()
    report = tmp_path / "scorecard.md"
    out = subprocess.run([PYTHON, os.path.join(ROOT, "bench", "run.py"), "--smoke", "--report", str(report)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("picosnitch: detection 4/4; bandwidth 4/4 (4 within ±1% of application bytes")
    text = report.read_text()
    for section in ("## Scenarios", "## Footprint", "## Overhead", "## Summary"):
        assert section in text
    for sid in ("s01", "s04", "s11", "s15"):
        assert f"| {sid} " in text


def test_view_benchmark_on_a_small_log(tmp_path):
    """bench/view.py on 20,000 rows: every part runs and reports."""
    report = tmp_path / "view.md"
    out = subprocess.run([PYTHON, os.path.join(ROOT, "bench", "view.py"), "--rows", "20000", "--report", str(report)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("view: 20,000 rows, start ") and "target 200 ms met" in summary
    text = report.read_text()
    assert "| right | 13 |" in text and "SEARCH connections USING INTEGER PRIMARY KEY (rowid>?)" in text
