"""`python -m inception_fast gpu-check` without a GPU: its logic in tiny mode (the Triton
kernels in the interpreter), its exit codes, and that a kernel which skips work fails it.

The tiny-mode tests need TRITON_INTERPRET=1 before triton is imported, so `make test` runs
this file a second time in the interpreter's pytest process; the others run in the first.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from inception_fast.cli import main

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="needs TRITON_INTERPRET=1 before import (make test runs this file that way)")
once = pytest.mark.skipif(INTERPRETING, reason="runs in the plain pytest process of make test")

GRADIENTS = {"dx", "dw1", "db1", "dw3r", "db3r", "dw3", "db3", "dw5r", "db5r", "dw5", "db5", "dwp", "dbp"}


@once
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "inception_fast", "gpu-check", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], out.stderr
    assert out.stdout == "" and not (tmp_path / "out").exists()


@once
def test_quick_and_tiny_exclude_each_other(capsys):
    assert main(["gpu-check", "--quick", "--tiny"]) == 2
    assert "exclude each other" in capsys.readouterr().err


@once
def test_instruments_put_everything_back():
    from inception_fast.gpu_check import poisoned_allocations, precision

    empty = torch.empty
    with poisoned_allocations():
        assert torch.isnan(torch.empty(3, 2)).all() and torch.isnan(torch.empty_like(torch.ones(4))).all()
        assert torch.empty(3, dtype=torch.int64).dtype == torch.int64  # integers: left as allocated
    assert torch.empty is empty
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with precision("tf32") as dtype:
        assert dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with precision("bf16") as dtype:
        assert dtype == torch.bfloat16 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


@once
@pytest.mark.parametrize("params, expected", [
    ("fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode='mean'", {"return_mode": "median"}),
    ("fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, fast_flush=True", {"quantiles": [0.5]}),
    ("fn, warmup=25, rep=100", {}),
])
def test_do_bench_is_asked_for_the_median_in_each_signature_it_had(params, expected, monkeypatch):
    import triton.testing

    from inception_fast.bench import do_bench_median

    seen = {}
    namespace = {}
    exec(f"def do_bench({params}):\n    seen.update(locals())\n    return 1.5", {"seen": seen}, namespace)
    monkeypatch.setattr(triton.testing, "do_bench", namespace["do_bench"])
    assert do_bench_median(lambda: None, warmup=5, rep=20) == 1.5
    assert seen["warmup"] == 5 and seen["rep"] == 20
    for key, value in expected.items():
        assert seen[key] == value


@once
def test_exact_fp32_k_slice_is_one_the_installed_triton_compiles(monkeypatch):
    """triton 3.6 (the GPU machine's) asserts K >= 16 for an fp32 tl.dot, 3.8 allows 8: the
    exact-fp32 configs follow the installed backend's bound, and 16 where it cannot be read."""
    import triton.backends.nvidia.compiler as nvidia

    from inception_fast.ops import triton_gemm

    assert triton_gemm.EXACT_FP32_BLOCK_K == max(8, triton_gemm.min_fp32_dot_k())
    exact = triton_gemm.kernel_configs("spatial", True)
    assert all(c.block_k == triton_gemm.EXACT_FP32_BLOCK_K for c in exact)
    monkeypatch.setattr(nvidia, "min_dot_size", lambda target: lambda lhs, rhs: (1, 1, 16))  # triton 3.6's rule
    assert triton_gemm.min_fp32_dot_k() == 16
    monkeypatch.delattr(nvidia, "min_dot_size")
    assert triton_gemm.min_fp32_dot_k() == 16


@needs_interpreter
def test_tiny_mode_checks_every_section_and_writes_json_and_markdown(tmp_path, capsys):
    assert main(["gpu-check", "--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["ok"] and data["mode"] == "tiny" and data["summary"]["failed"] == 0 and not data["errors"]
    checks = data["checks"]
    assert {c["section"] for c in checks} == {"googlenet", "awkward", "v3", "networks", "launches"}
    for case in ("tiny n=1", "tiny n=2"):  # the forward and all thirteen gradients
        assert {c["quantity"] for c in checks if c["case"] == case} == {"forward"} | GRADIENTS
    v3 = {c["case"].split(" ")[0] for c in checks if c["section"] == "v3"}
    # grid reductions B and D, a stem unit and (timm, a test extra) a residual block included
    assert v3 == {f"Inception{k}" for k in "ABCDE"} | {"stem", "Block35"}
    assert any(c["quantity"] == "module backward: every gradient finite" for c in checks)
    assert {(r["case"], r["triton_launches"]) for r in data["launches"]} >= {
        ("googlenet tiny forward", 2), ("googlenet tiny backward", 4),
        ("Block35 (Inception-ResNet-v2) forward", 4)}  # three stages, then the tail's epilogue
    assert all(r["triton_launches"] == r["expected"] for r in data["launches"])
    block = data["speed"]["blocks"][0]
    assert {"fused", "eager_channels_last"} <= block["ms"].keys() and block["tune_s"] >= 0
    assert data["speed"]["peak"]["mm_tflops"] > 0
    assert any(s["what"].startswith("offset") for s in data["skipped"])  # and says so
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["triton"]

    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# inception_fast gpu-check (tiny): PASS")
    assert "| googlenet | tiny n=1 | fp32 | 14 |" in md and "## Kernel launches per call" in md
    assert "### GoogLeNet blocks, fp32" in md and "## Not run" in md
    progress = capsys.readouterr().err
    assert re.search(r"^\[\s*\d+\.\ds\] == googlenet$", progress, re.M)  # progress lines with elapsed time


@needs_interpreter
def test_a_kernel_that_skips_its_work_fails_the_check(tmp_path, monkeypatch):
    """The stage kernel launches do nothing: the output stays as allocated, which the
    check's poisoned allocations make NaN, and the run exits 1."""
    from inception_fast.ops import branch_graph_triton

    class LaunchesNothing:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(branch_graph_triton, "_graph_stage_kernel", LaunchesNothing())
    assert main(["gpu-check", "--tiny", "--sections", "googlenet", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not data["ok"]
    forward = [c for c in data["failures"] if c["quantity"] == "forward"]
    assert forward and all("NaN" in c["note"] for c in forward)
    assert (tmp_path / "gpu_check.md").read_text().startswith("# inception_fast gpu-check (tiny): FAIL")


@once
def test_fp32_is_held_to_eager_only_where_eager_itself_misses_the_limit(tmp_path):
    """A weight gradient from cuDNN carries cuDNN's own fp32 error, in eager as in the fused
    backward: there (and only there) the limit becomes 2x eager's error."""
    from inception_fast.gpu_check import GpuCheck

    check = GpuCheck("tiny", tmp_path, torch.device("cpu"))
    want = torch.ones(100, dtype=torch.float64)
    off = lambda e: want * (1 + e)  # noqa: E731  (relative error e)
    cudnn = dict(cudnn_fp32=True)
    assert check.compare("s", "c", "fp32", "dw5", off(1e-6), want, off(5e-7), **cudnn).ok  # under 1e-5: passes
    assert not check.compare("s", "c", "fp32", "dw5", off(1e-4), want, off(1e-6), **cudnn).ok  # eager exact
    held = check.compare("s", "c", "fp32", "dw5", off(8e-4), want, off(8e-4), **cudnn)
    assert held.ok and "cuDNN" in held.note and held.limit == pytest.approx(1.6e-3)
    assert not check.compare("s", "c", "fp32", "dw5", off(2e-3), want, off(8e-4), **cudnn).ok  # worse than 2x eager
    assert not check.compare("s", "c", "fp32", "dw5", off(float("nan")), want, off(8e-4), **cudnn).ok
    # Not a cuDNN quantity (dx is the Triton kernels'), or an eager so far off that no
    # rounding explains it: the 1e-5 limit stands.
    assert not check.compare("s", "c", "fp32", "dx", off(8e-4), want, off(8e-4)).ok
    assert not check.compare("s", "c", "fp32", "dw5", off(0.5), want, off(0.5), **cudnn).ok
    assert not check.compare("s", "c", "fp32", "dw5", off(1.0), want, want * float("inf"), **cudnn).ok
    # Without an absolute limit, eager's error bounds fp32 as any precision.
    assert not check.compare("s", "c", "fp32", "q", off(0.5), want, off(1e-7), absolute=False).ok


@pytest.mark.parametrize("relu", [True, False])
def test_the_residual_blocks_built_without_timm_fuse_as_residual_blocks(relu):
    """A GPU machine's image has no timm: the v3 section then builds Inception-ResNet's
    blocks itself (gpu_check.ResidualBlock), which must parse as residual blocks and match."""
    import copy

    from inception_fast.cli import _randomize_bn_
    from inception_fast.fused_graph import FusedBranchGraph
    from inception_fast.gpu_check import ResidualBlock

    block = _randomize_bn_(ResidualBlock(12, [[(4, 1, 1)], [(3, 1, 1), (5, 1, 3), (6, 3, 1)]], 0.3, relu=relu)).eval()
    fused = FusedBranchGraph.from_module(copy.deepcopy(block)).eval()
    assert fused.graph.residual is not None and fused.graph.residual.relu == relu and fused.graph.residual.scale == 0.3
    x = torch.randn(2, 12, 5, 4)
    with torch.no_grad():
        assert torch.allclose(fused(x), block(x), rtol=1e-5, atol=1e-6)
