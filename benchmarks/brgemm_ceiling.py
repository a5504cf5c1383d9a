"""Is oneDNN's brgemm a faster GEMM than ours? fp32, one thread, GoogLeNet's GEMM shapes.

    PYTHONPATH=. python benchmarks/brgemm_ceiling.py [--batch 8] [--reps 40]

For each block, its stage-0 1x1 GEMM over x (K = in_channels, N = the three 1x1s) and its
3x3 GEMM (K = 9 * ch3x3red, N = ch3x3), both over batch * H * W rows:
- ours: the fused op (csrc/) on a one-branch graph whose branch ends in that GEMM with N
  columns, minus the same graph with 16 columns: the difference is the GEMM alone,
  implicit (taps over the zero-bordered intermediate) with our epilogue;
- brgemm: at::native::cpublas::brgemm (torch's oneDNN batch-reduce GEMM micro-kernel) on an
  im2col'd, contiguous A, in tiles of 192 x 64: a ceiling for brgemm, which inside the
  fused schedule would read the same taps we do.
- mm: torch.mm (MKL) on the same A and B.
The C++ shim compiles once with torch.utils.cpp_extension.load_inline (~40 s). Timings
alternate the contenders (inception_fast.bench.time_alternating), medians of --reps.
"""

import argparse
import torch
from torch.utils.cpp_extension import load_inline

import inception_fast as ifast
from inception_fast.bench import time_alternating
from inception_fast.ops.branch_graph import pack_weights
from inception_fast.ops.plan import plan

_SHIM = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
// C (M, N) = A (M, K) @ B (K, N), row-major fp32, as brgemm calls on mb x nb tiles of C.
torch::Tensor brgemm_mm(torch::Tensor A, torch::Tensor B, int64_t mb, int64_t nb) {
  const int64_t M = A.size(0), K = A.size(1), N = B.size(1);
  auto C = torch::empty({M, N}, A.options());
  const float* a = A.data_ptr<float>();
  const float* b = B.data_ptr<float>();
  float* c = C.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += nb)
    for (int64_t m0 = 0; m0 < M; m0 += mb)
      at::native::cpublas::brgemm(std::min(mb, M - m0), std::min(nb, N - n0), K, K, N, N, false,
                                  a + m0 * K, b + n0, c + m0 * N + n0);
  return C;
}
"""


def fused_call(spec, x):
    graph = plan(spec)
    weights = [torch.randn(c.out_channels, c.in_channels, c.kh, c.kw) / (c.in_channels * c.kh * c.kw) ** 0.5
               for c in spec.convs]
    b, bias = pack_weights(graph, weights, [torch.rand(c.out_channels) for c in spec.convs], "cpu")
    flat = graph.flat()
    return lambda: torch.ops.inception_fast.graph_forward(x, b, bias, flat)


def one_branch(chain, in_channels):
    conv = ifast.Conv
    return ifast.BranchGraphSpec(in_channels, (ifast.Branch(tuple((c,) for c in chain)),), "max",
                                 conv(in_channels, 16))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shim = load_inline("inception_fast_brgemm_shim", cpp_sources=_SHIM, functions=["brgemm_mm"],
                       extra_cflags=["-O3"])
    conv = ifast.Conv
    print("| block | GEMM | M x K x N | ours GMAC/s | brgemm GMAC/s | mm GMAC/s | brgemm / ours |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in ("3a", "4b", "4e", "5b"):
        paper = ifast.GOOGLENET_INCEPTION[name]
        s, size = paper.spec, paper.size
        x = torch.randn(args.batch, s.in_channels, size, size).contiguous(memory_format=torch.channels_last)
        rows = args.batch * size * size
        n1 = s.ch1x1 + s.ch3x3red + s.ch5x5red
        cases = [("1x1 over x", s.in_channels, n1,
                  one_branch([conv(s.in_channels, n1)], s.in_channels),
                  one_branch([conv(s.in_channels, 16)], s.in_channels)),
                 ("3x3", 9 * s.ch3x3red, s.ch3x3,
                  one_branch([conv(s.in_channels, s.ch3x3red), conv(s.ch3x3red, s.ch3x3, 3, 3)], s.in_channels),
                  one_branch([conv(s.in_channels, s.ch3x3red), conv(s.ch3x3red, 16, 3, 3)], s.in_channels))]
        for label, k, n, full, small in cases:
            a, w = torch.randn(rows, k), torch.randn(k, n)
            t = time_alternating({"full": fused_call(full, x), "small": fused_call(small, x),
                                  "brgemm": lambda: shim.brgemm_mm(a, w, 192, 64), "mm": lambda: torch.mm(a, w)},
                                 reps=args.reps)
            t_full, t_small, t_brgemm, t_mm = t["full"], t["small"], t["brgemm"], t["mm"]
            ours = rows * k * (n - 16) / (t_full - t_small) / 1e9
            brgemm, mm = rows * k * n / t_brgemm / 1e9, rows * k * n / t_mm / 1e9
            print(f"| {name} | {label} | {rows} x {k} x {n} | {ours:.1f} | {brgemm:.1f} | {mm:.1f} | "
                  f"{brgemm / ours:.2f} |")


if __name__ == "__main__":
    main()
