"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only`.

Sizes come from INCEPTION_FAST_BENCH_BATCHES (default "1,8,32") and dtypes from
INCEPTION_FAST_BENCH_DTYPES (default "float32,float64" on CPU, "float16,bfloat16,float32"
on CUDA); the smoke test in tests/ runs every case once at batch 1 with
INCEPTION_FAST_BENCH_SMOKE=1. On a machine with a GPU the suite runs on CUDA.
"""

import os

import pytest
import torch

SMOKE = os.environ.get("INCEPTION_FAST_BENCH_SMOKE") == "1"
BATCHES = [1] if SMOKE else [int(b) for b in os.environ.get("INCEPTION_FAST_BENCH_BATCHES", "1,8,32").split(",")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_DEFAULT_DTYPES = "float16,bfloat16,float32" if DEVICE == "cuda" else "float32,float64"
DTYPES = [getattr(torch, name) for name in os.environ.get("INCEPTION_FAST_BENCH_DTYPES", _DEFAULT_DTYPES).split(",")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
