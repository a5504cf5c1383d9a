"""The CPU kernel's schedule on one GEMM: a 1x1 convolution over x run through the fused op,
at channel counts whose pixel rows lie a multiple of 4 KB apart (1024, 2048 fp32) and just
past them (1040, 2064), on an 8x8 grid (Inception-v3's Mixed_7b/7c, Inception-ResNet's
Block8), at 1 and 2 threads.

    PYTHONPATH=. python benchmarks/cpu_schedule.py [--batch 8] [--reps 40] [--channels 1024,1040,2048,2064]

- 1 thread: rows 4 KB apart fall in one L1 set; before csrc/gemm.h copied them into a packed
  A (set_conflicting), 2048 channels ran ~10% below 2064 (48.9 against 54.2 GMAC/s here).
- 2 threads, batch 8: the image-major schedule used to cut 8 images of 8x8 into groups of
  6 and 2 (66.8-71.5 GMAC/s); the even groups give 4 and 4.
Random weights, float32, channels_last, no_grad; median of --reps calls after warm-up.
"""

import argparse
import statistics
import time

import torch

from inception_fast.ops.branch_graph import graph_forward_inference, pack_weights
from inception_fast.ops.plan import plan
from inception_fast.spec import Branch, BranchGraphSpec, Conv


def gmacs(channels: int, batch: int, reps: int, cols: int = 384, size: int = 8) -> float:
    graph = plan(BranchGraphSpec(channels, (Branch(((Conv(channels, cols),),)),), None, None))
    packed = pack_weights(graph, [torch.randn(cols, channels, 1, 1) * 0.02], [torch.zeros(cols)], "cpu")
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    flat = graph.flat()
    with torch.no_grad():
        for _ in range(5):
            graph_forward_inference(x, *packed, flat)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            graph_forward_inference(x, *packed, flat)
            times.append(time.perf_counter() - start)
    return batch * size * size * channels * cols / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--channels", default="1024,1040,2048,2064")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print("| channels | row stride | threads | GMAC/s |\n|---:|---:|---:|---:|")
    # The full pool first: re-grown after 1 thread, it ran its first case at half speed.
    for n in sorted({1, threads}, reverse=True):
        torch.set_num_threads(n)
        for channels in map(int, args.channels.split(",")):
            print(f"| {channels} | {channels * 4} B | {n} | {gmacs(channels, args.batch, args.reps):.1f} |", flush=True)
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
