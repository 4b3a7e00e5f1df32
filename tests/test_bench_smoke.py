"""The benchmark's smoke run (a few scenarios, one trial, picosnitch only), so
that the harness cannot rot. The full run is `bench/run.py` (bench/README.md)."""
import os
import re
import subprocess

from conftest import PYTHON, ROOT, need_root

import machine as bench_machine


def test_smoke_run_writes_a_scorecard(tmp_path):
    need_root()
    report = tmp_path / "scorecard.md"
    out = subprocess.run([PYTHON, os.path.join(ROOT, "bench", "run.py"), "--smoke", "--report", str(report)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("picosnitch: detection 4/4; bandwidth 4/4 (4 within ±1% of application bytes")
    text = report.read_text()
    for section in ("## Scenarios", "## Footprint", "## Overhead", "## Connection churn", "## Live event stream",
                    "## Summary"):
        assert section in text
    for sid in ("s01", "s04", "s11", "s15"):
        assert f"| {sid} " in text
    churned = re.search(r"^\| TCP, 1 program, as fast as they can \| [\d,]+ \| 0\.000% off \|", text, re.M)
    assert churned, text[text.index("## Connection churn"):][:1500]
    live = re.search(r"^\| the steady sender's bytes by the ticks against snitch\.db \([\d,]+ bytes\) \| \| "
                     r"0\.000% off", text, re.M)
    assert live, text[text.index("## Live event stream"):][:1500]


def test_log_benchmark_on_a_small_log(tmp_path):
    """bench/log.py on 20,000 rows (and a migration of 20,000): every part
    runs and reports (the floors of the migration and of the local ports
    included), and a log this small meets every target."""
    report = tmp_path / "log.md"
    out = subprocess.run([PYTHON, os.path.join(ROOT, "bench", "log.py"), "--rows", "20000", "--migrate-rows", "20000",
                          "--report", str(report)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("log: 19,999 rows: ") and "165/165 queries ≤ 200 ms" in summary
    for layout in ("v1", "upstream-1.0.3"):
        moved = re.search(f"migration of 19,999 rows from {layout}: .* keys meanwhile max (\\d+) ms, (\\d+) B/row after "
                          f"\\(was (\\d+)\\)", summary)
        assert moved and int(moved[2]) < int(moved[3]), summary
    text = report.read_text()
    for part in ("first screen after", "peak RSS", "| right |", "*exe =, domain ≠*", "pruning the two oldest days",
                 "the primary's cost per window", "| upstream-1.0.3 | 19,999 |", "The layout's floor",
                 "the floor of totals by local port over the week"):
        assert part in text, part
    floors = [line.split(" | ") for line in text.splitlines() if line.startswith(("| v1 | ", "| upstream-1.0.3 | "))]
    assert len(floors) == 4         # (the rate, then the floor, of each layout)
    for cells in floors[2:]:        # interning, copying, grouping, summing, freeing, together, rows/s: all measured
        assert all(float(c.replace(",", "").strip(" |")) > 0 for c in cells[1:]), cells


def test_the_machine_is_described():
    """bench/machine.py's description, under every report's title, names the
    CPU model and microcode of /proc/cpuinfo, the kernel's release, each file
    of /sys/devices/system/cpu/vulnerabilities with its line, and the BPF
    JIT's hardening; its one-line summary names the CPU and microcode."""
    lines = bench_machine.describe()
    text = "\n".join(lines)
    cpu = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            cpu.setdefault(name.strip(), value.strip())
    model, microcode = cpu.get("model name", "unknown"), cpu.get("microcode", "unknown")
    assert f"- CPU: {model}" in text and f"microcode {microcode}" in text, text
    assert f"{model} (microcode {microcode})" in bench_machine.summary()
    assert f"- kernel: {os.uname().release} ({os.uname().version})" in lines
    vulnerabilities = "/sys/devices/system/cpu/vulnerabilities"
    if os.path.isdir(vulnerabilities):
        names = sorted(os.listdir(vulnerabilities))
        assert names
        for name in names:
            with open(os.path.join(vulnerabilities, name)) as f:
                assert f"  - {name}: {f.readline().strip()}" in lines, name
    try:
        with open("/proc/sys/net/core/bpf_jit_harden") as f:
            harden = f.readline().strip()
    except OSError:
        harden = "unknown"
    assert f"bpf_jit_harden {harden}" in text, text


def test_novelty_benchmark_on_a_short_month(tmp_path):
    """bench/novelty.py on five days (two to settle) and a log of 20,000 rows:
    every part runs and reports, the replay of the volume rule finds what the
    primary told, and the new country, domain and hash are caught."""
    report = tmp_path / "novelty.md"
    out = subprocess.run([PYTHON, os.path.join(ROOT, "bench", "novelty.py"), "--days", "5", "--settle-days", "2",
                          "--rows", "20000", "--keep", str(tmp_path), "--cost-windows", "20", "--report", str(report)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("novelty: ") and "per 40-row window" in summary and "built from 19,999 rows" in summary
    text = report.read_text()
    for part in ("## Notifications a day", "## Held-out anomalies", "## The volume rule's factor and minimum",
                 "finds exactly what the primary told: yes", "| novelty's added cost per window |", "## Size",
                 "| 19,999 |", "## Targets", "- errors the primary reported: 0"):
        assert part in text, part
    caught = {line.split(" | ")[1]: line.split(" | ")[2] for line in text.splitlines()
              if line.startswith("| ") and line.split(" | ")[1:2] in (["country"], ["domain"], ["volume"], ["hash"])}
    assert caught["country"] == caught["domain"] == caught["hash"] == "yes", caught
