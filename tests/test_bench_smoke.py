"""Every benchmark runs once at tiny sizes, so that the suite and the report cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

from inception_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_pytest_benchmark_suite_runs_once(tmp_path):
    env = dict(os.environ, INCEPTION_FAST_BENCH_SMOKE="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "benchmarks"),
         "--benchmark-disable"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout


def test_bench_command_writes_results(tmp_path, capsys):
    assert main(["bench", "--blocks", "5a", "--batch", "1", "--no-compile", "--reps", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    case = data["cases"][0]
    assert case["block"] == "5a" and {"fused", "eager_nchw", "eager_channels_last"} <= case["ms"].keys()
    assert (tmp_path / "bench_speedup.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 5a | 1 |" in capsys.readouterr().out
