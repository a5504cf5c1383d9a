"""Every benchmark runs once at tiny sizes, so that the suite and the report cannot rot."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inception_fast import bench
from inception_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~2 min: every provider, compile included; `make test-all` runs it
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
    csv_rows = (tmp_path / "bench.csv").read_text().splitlines()
    assert csv_rows[0].startswith("block,batch,dtype,backend,provider,ms")
    assert any(row.startswith("5a,1,float32,auto,fused,") and row.endswith(",1.0000") for row in csv_rows)
    assert "| 5a | 1 |" in capsys.readouterr().out


def test_cuda_report_adds_tflops_and_percent_of_device_peak(monkeypatch):
    """The CUDA columns, checked without a GPU: a report whose machine has a datasheet peak."""
    import torch

    from inception_fast import bench

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.device_peak_tflops("cuda", torch.bfloat16) == 989.4
    assert bench.device_peak_tflops("cpu", torch.float32) is None
    case = bench.CaseResult(block="3a", batch=256, dtype="bfloat16", backend="triton", macs=10**12,
                            ms={"fused": 4.0, "eager_channels_last": 8.0})
    report = bench.BenchReport(machine={"cpu": "H100", "threads": "GPU", "torch": "x", "date": "d",
                                        "peak_tflops": "989.4"},
                               ceiling_gmacs={"mm": 400_000.0}, cases=[case])
    text = report.to_markdown()
    assert "TFLOP/s | % of device peak" in text
    assert "| 3a | 256 | 4.00 | 250000.0 | 62% | 500.0 | 51% | 2.00× |" in text


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc (Linux)")
def test_a_report_taken_under_load_says_its_timings_are_not_reliable():
    """other_processes_busy sees a spinning child process (about one core while this one
    sleeps), and a report whose run began with a core busy says so under its table."""
    from inception_fast import bench

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)  # the interpreter's start-up
        assert bench.other_processes_busy(1.0) >= 0.4
    finally:
        spin.kill()
        spin.wait()
    case = bench.CaseResult(block="3a", batch=1, dtype="float32", backend="cpu", macs=10**8,
                            ms={"fused": 1.0, "eager_channels_last": 2.0})
    machine = {"cpu": "x", "threads": "2", "torch": "x", "date": "d"}
    quiet = bench.BenchReport(machine={**machine, "busy_cores": "0.02"}, ceiling_gmacs={"mm": 100.0}, cases=[case])
    loaded = bench.BenchReport(machine={**machine, "busy_cores": "1.01"}, ceiling_gmacs={"mm": 100.0}, cases=[case])
    assert "not reliable" not in quiet.to_markdown()
    assert "Other processes kept 1.01 cores busy when this run began" in loaded.to_markdown()


def test_networks_table_has_every_contender_and_the_compile_times():
    from inception_fast.bench import networks_markdown

    row = {"model": "m", "batch": 1, "ms": {"fused": 10.0, "eager_channels_last": 20.0, "compile_freezing": 12.0,
                                            "compile_swapped": 8.0}, "compile_s": {"compile_freezing": 30.0,
                                                                                  "compile_swapped": 20.0}}
    line = networks_markdown([row]).splitlines()[-1]
    assert line == "| m | 1 | 20.0 | 10.0 | 12.0 | 8.0 | 2.00× | 1.20× | 1.50× | 30 / 20 |"


def test_whole_networks_refuses_other_devices_and_dtypes(capsys):
    assert main(["bench", "--whole-networks", "--dtype", "float64"]) == 2
    assert "--whole-networks runs on the CPU in float32" in capsys.readouterr().err


def test_train_bench_times_blocks_and_steps(monkeypatch):
    """bench --train's two parts on the smallest cases: a 7x7 block (the original runs
    there, by bn_train_min_pixels) and one googlenet step at batch 2, every contender."""
    from inception_fast import bench_train

    monkeypatch.setattr(bench_train, "gemm_ceiling", lambda *a, **k: {"mm": 1.0})
    report = bench_train.bench_train_blocks(["5b"], [2], reps=1)
    (case,) = report.cases
    assert set(case.ms) == {"fused", "eager_channels_last", "eager_nchw"} and case.macs > 0
    rows = bench_train.bench_train_steps([("torchvision googlenet", 2)], reps=1)
    table = bench_train.train_steps_markdown(rows)
    assert set(rows[0]["ms"]) == {"fused", "fused_convs", "eager_channels_last"}
    assert "| torchvision googlenet | 2 |" in table and rows[0]["speedup"] > 0 and rows[0]["speedup_convs"] > 0
    if bench.minor_page_faults() is not None:  # every contender's page faults, in both tables
        assert set(case.faults) == set(case.ms) and set(rows[0]["page_faults"]) == set(rows[0]["ms"])
        assert "page faults/call fused / eager CL" in report.to_markdown()
        assert "page faults/step eager / swapped / convs=True |" in table.splitlines()[0]


@pytest.mark.parametrize("env, expected", [
    ({}, "glibc (default)"),
    ({"MALLOC_TOP_PAD_": "268435456", "THP_MEM_ALLOC_ENABLE": "1"},
     "glibc, MALLOC_TOP_PAD_=268435456 THP_MEM_ALLOC_ENABLE=1"),
    # Named, but not loaded into this process: said so, not taken for the allocator.
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4", "MALLOC_TOP_PAD_": "1"},
     "glibc, MALLOC_TOP_PAD_=1; LD_PRELOAD names tcmalloc, which did not load"),
])
def test_bench_footer_names_the_allocator(monkeypatch, env, expected):
    """machine_info's allocator, from the environment and what the process has mapped;
    the footer of every CPU table carries it (it moves CPU timings by 10-30%)."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("reads /proc/self/maps (Linux)")
    if any(name in Path("/proc/self/maps").read_text() for name in ("tcmalloc", "jemalloc", "mimalloc")):
        pytest.skip("this test process itself runs under another allocator")
    for key in [k for k in os.environ if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert bench.allocator() == expected
    case = bench.CaseResult(block="3a", batch=1, dtype="float32", backend="cpu", macs=10**8,
                            ms={"fused": 1.0, "eager_channels_last": 2.0})
    machine = {"cpu": "x", "threads": "2", "torch": "x", "date": "d", "allocator": bench.allocator()}
    text = bench.BenchReport(machine=machine, ceiling_gmacs={"mm": 100.0}, cases=[case]).to_markdown()
    assert f"Allocator: {expected}." in text


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_allocator_sees_a_preloaded_tcmalloc():
    """A child process under LD_PRELOAD=tcmalloc (where the library is installed) reports it."""
    import ctypes.util

    library = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if library is None:
        pytest.skip("tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
    out = subprocess.run([sys.executable, "-c", "import inception_fast.bench as b; print(b.allocator())"],
                         env=dict(os.environ, LD_PRELOAD=library, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "tcmalloc (LD_PRELOAD)"


@pytest.mark.skipif(bench.minor_page_faults() is None, reason="getrusage (the resource module) is Unix-only")
def test_time_alternating_counts_each_contenders_page_faults():
    """A contender that maps and writes 64 MiB of fresh pages each call faults at least once
    per 2 MiB (a huge page, the most the kernel maps per fault); one that touches nothing
    new faults far less."""
    import mmap

    def fresh_pages():
        m = mmap.mmap(-1, 64 << 20)
        for offset in range(0, 64 << 20, 4096):
            m[offset] = 1
        m.close()

    faults: dict[str, float] = {}
    seconds = bench.time_alternating({"fresh": fresh_pages, "idle": lambda: None}, reps=5, faults=faults)
    assert set(seconds) == set(faults) == {"fresh", "idle"}
    assert faults["fresh"] >= 32 and faults["idle"] < faults["fresh"] / 4


def test_train_bench_refuses_other_modes(capsys):
    assert main(["bench", "--train", "--v3"]) == 2
    assert "--train runs on the CPU in float32, alone" in capsys.readouterr().err
