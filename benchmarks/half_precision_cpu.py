"""Half precision on the CPU: the measurements behind the README's "bfloat16 on the CPU".

    PYTHONPATH=. python benchmarks/half_precision_cpu.py fp16      # fused fp16 vs eager fp16, fused fp32
    PYTHONPATH=. python benchmarks/half_precision_cpu.py profile   # bf16 train step of 3a, op by op
    PYTHONPATH=. python benchmarks/half_precision_cpu.py brgemm    # can oneDNN's bf16 brgemm run here?

fp16: GoogLeNet blocks, channels_last, no_grad, medians of --reps alternating calls
(inception_fast.bench.time_alternating); `bench --dtype float16` refuses on CPUs without
AVX512-FP16, where its fp16 GEMM ceiling takes too long to measure.
profile: torch.profiler self CPU time per op over 3 forward+backward steps of 3a at batch 32
in bf16, fused and eager channels_last.
brgemm: at::native::cpublas::brgemm in bf16 through a C++ shim compiled with load_inline
(~40 s): could_pack(bf16), the VNNI-packed call, and the unpacked call's GMAC/s at one
thread against torch.mm in fp32 and bf16.
"""

import argparse
import copy
import time

import torch

import inception_fast as ifast
from inception_fast.bench import time_alternating

_BRGEMM_SHIM = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
bool could_pack_bf16() { return at::native::cpublas::could_pack(at::kBFloat16); }
// B (K, N) bf16 in oneDNN's VNNI layout, as cpublas::pack writes it.
torch::Tensor pack_bf16(torch::Tensor B) {
  auto out = torch::empty({B.numel() + 64}, B.options());
  at::native::cpublas::pack(B.size(0), B.size(1), B.size(1), B.size(1), at::kBFloat16, at::kBFloat16,
                            B.data_ptr(), out.data_ptr());
  return out;
}
// C (M, N) fp32 = A (M, K) @ B (K, N), bf16, in tiles of 64 x 64.
torch::Tensor mm_bf16(torch::Tensor A, torch::Tensor B, int64_t N, bool vnni) {
  const int64_t M = A.size(0), K = A.size(1);
  auto C = torch::empty({M, N}, A.options().dtype(at::kFloat));
  auto a = static_cast<const at::BFloat16*>(A.data_ptr());
  auto b = static_cast<const at::BFloat16*>(B.data_ptr());
  for (int64_t n0 = 0; n0 < N; n0 += 64)
    for (int64_t m0 = 0; m0 < M; m0 += 64)
      at::native::cpublas::brgemm(std::min<int64_t>(64, M - m0), std::min<int64_t>(64, N - n0), K, K, N, N, false,
                                  a + m0 * K, b + n0 * (vnni ? 2 : 1), C.data_ptr<float>() + m0 * N + n0, vnni);
  at::native::cpublas::brgemm_release(vnni);
  return C;
}
"""


def fp16(reps: int) -> None:
    print("| block | batch | fused fp16 ms | eager CL fp16 ms | fused vs eager fp16 | fused fp16 vs fused fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    for name, batch in (("3a", 1), ("3b", 32), ("4e", 8), ("5b", 1)):
        paper = ifast.GOOGLENET_INCEPTION[name]
        ref = ifast.ReferenceInception(paper.spec).eval()
        eager = copy.deepcopy(ref).half().to(memory_format=torch.channels_last)
        fused16 = ifast.FusedInception.from_module(copy.deepcopy(ref)).half()
        fused32 = ifast.FusedInception.from_module(copy.deepcopy(ref))
        x = torch.randn(batch, paper.spec.in_channels, paper.size, paper.size).contiguous(
            memory_format=torch.channels_last)
        xh = x.half()
        with torch.no_grad():
            t = time_alternating({"eager": lambda: eager(xh), "fused16": lambda: fused16(xh),
                                  "fused32": lambda: fused32(x)}, reps=reps)
        print(f"| {name} | {batch} | {t['fused16'] * 1e3:.2f} | {t['eager'] * 1e3:.1f} | "
              f"{t['eager'] / t['fused16']:.2f}× | {t['fused32'] / t['fused16']:.2f}× |")


def profile() -> None:
    paper = ifast.GOOGLENET_INCEPTION["3a"]
    ref = ifast.ReferenceInception(paper.spec).train()
    models = {"fused": ifast.FusedInception.from_module(copy.deepcopy(ref)).bfloat16(),
              "eager channels_last": copy.deepcopy(ref).bfloat16().to(memory_format=torch.channels_last)}
    x = torch.randn(32, paper.spec.in_channels, paper.size, paper.size).bfloat16().contiguous(
        memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(32, paper.spec.out_channels, paper.size, paper.size).bfloat16().contiguous(
        memory_format=torch.channels_last)
    for name, model in models.items():
        for _ in range(2):
            model(x).backward(grad)
        with torch.profiler.profile() as prof:
            for _ in range(3):
                model(x).backward(grad)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        print(f"\n{name}: self CPU ms per step")
        for e in events:
            print(f"  {e.key:45s} {e.self_cpu_time_total / 3e3:7.1f}")


def brgemm() -> None:
    from torch.utils.cpp_extension import load_inline

    shim = load_inline("inception_fast_brgemm_bf16_probe", cpp_sources=_BRGEMM_SHIM,
                       functions=["could_pack_bf16", "pack_bf16", "mm_bf16"], extra_cflags=["-O3"])
    torch.set_num_threads(1)
    m, k, n = 3136, 480, 256
    a, b = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
    print(f"cpublas::could_pack(bf16): {shim.could_pack_bf16()}")
    try:
        shim.mm_bf16(a, shim.pack_bf16(b), n, True)
        print("VNNI-packed bf16 brgemm: runs")
    except RuntimeError as exc:
        print(f"VNNI-packed bf16 brgemm: fails ({str(exc).splitlines()[0]})")

    def gmacs(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        return m * k * n / ((time.perf_counter() - start) / 5) / 1e9

    print(f"unpacked bf16 brgemm: {gmacs(lambda: shim.mm_bf16(a, b, n, False)):.0f} GMAC/s (1 thread)")
    a32, b32 = a.float(), b.float()
    print(f"torch.mm fp32: {gmacs(lambda: torch.mm(a32, b32)):.0f}, bf16: {gmacs(lambda: torch.mm(a, b)):.0f} GMAC/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("fp16", "profile", "brgemm"))
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    {"fp16": lambda: fp16(args.reps), "profile": profile, "brgemm": brgemm}[args.part]()


if __name__ == "__main__":
    main()
