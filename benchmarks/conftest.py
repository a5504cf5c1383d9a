"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only`.

Sizes come from INCEPTION_FAST_BENCH_BATCHES (default "1,8,32"); the smoke test in
tests/ runs every case once at batch 1 with INCEPTION_FAST_BENCH_SMOKE=1.
"""

import os

import pytest
import torch

SMOKE = os.environ.get("INCEPTION_FAST_BENCH_SMOKE") == "1"
BATCHES = [1] if SMOKE else [int(b) for b in os.environ.get("INCEPTION_FAST_BENCH_BATCHES", "1,8,32").split(",")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
