"""Follow-up GPU probe to `python -m inception_fast gpu-check`: what one run left open.

1. **cuDNN's fp32 weight gradient.** The fused backward takes its weight gradients from
   `aten.convolution_backward` (cuDNN), as eager does. On dyadic data every fp32 sum is
   exact, so any error against fp64 is the algorithm's own (FFT/Winograd weight-gradient
   algorithms are not exact). Compares, per GoogLeNet block's K x K convolutions, the
   fused module's dW, eager fp32's dW and a bare `convolution_backward` against fp64,
   with `cudnn.deterministic` off and on.
2. **Host overhead.** Every block at batch 32 timed ~0.75 ms fused and ~0.71 ms eager
   with `do_bench`, whatever its size: both host-bound. Times each contender as launched
   from Python (`do_bench`), as CUDA-graph replay (device time only), and the host's
   submit time per call (no sync); then a cProfile of the fused call.

3. **Whole networks** at batch 32 (bf16; Inception-v3 also fp32, as FID runs it): `bench_networks`' contenders (with `--compile`,
   compile(model) and compile(swap(model)) with freezing), and eager and swapped as
   CUDA-graph replays, with the logits' error against fp64.

Usage (on a GPU machine, from a plain checkout): `PYTHONPATH=. python benchmarks/gpu_probe.py --out DIR`.
`--dry` runs the same code on CPU tiny shapes under TRITON_INTERPRET=1 (no graphs).
Writes DIR/gpu_probe.json and prints tables.
"""

from __future__ import annotations

import argparse
import cProfile
import copy
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from inception_fast.bench import _sync, do_bench_median
from inception_fast.fused import FusedInception
from inception_fast.fused_graph import FusedBranchGraph
from inception_fast.gpu_check import _dyadic, _dyadic_, cuda_graph_ms, precision
from inception_fast.reference import ReferenceInception
from inception_fast.spec import GOOGLENET_INCEPTION, InceptionSpec
from inception_fast.verify import _error


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return _error("", got, want).rel


def wgrad_exactness(dev, blocks, batch: int) -> list[dict]:
    rows = []
    for name in blocks:
        b = GOOGLENET_INCEPTION[name]
        spec, size = b.spec, b.size
        for deterministic in (False, True):
            torch.backends.cudnn.deterministic = deterministic
            with precision("fp32") as dtype:
                ref = _dyadic_(ReferenceInception(spec).to(dev, dtype))
                x = _dyadic((batch, spec.in_channels, size, size), dev, dtype).contiguous(
                    memory_format=torch.channels_last)
                grad = _dyadic((batch, spec.out_channels, size, size), dev, dtype).contiguous(
                    memory_format=torch.channels_last)
                grads = {}
                for label, model, xin in (("fp64", copy.deepcopy(ref).double(), x.double()),
                                          ("eager fp32", copy.deepcopy(ref).to(memory_format=torch.channels_last), x),
                                          ("fused fp32", FusedInception.from_module(copy.deepcopy(ref),
                                                                                     backend="triton").train(), x)):
                    for _ in range(2):  # the first fused call autotunes
                        model.zero_grad(set_to_none=True)
                        xg = xin.clone().requires_grad_()
                        model(xg).backward(grad.to(xin.dtype))
                    grads[label] = [xg.grad, *(p.grad for p in model.parameters())]
                names = ["dx", "dw1", "db1", "dw3r", "db3r", "dw3", "db3", "dw5r", "db5r", "dw5", "db5", "dwp", "dbp"]
                for i, q in enumerate(names):
                    row = {"block": name, "batch": batch, "deterministic": deterministic, "quantity": q,
                           "eager_fp32": rel(grads["eager fp32"][i], grads["fp64"][i]),
                           "fused_fp32": rel(grads["fused fp32"][i], grads["fp64"][i]),
                           "fused_vs_eager": rel(grads["fused fp32"][i], grads["eager fp32"][i])}
                    if row["eager_fp32"] or row["fused_fp32"]:
                        rows.append(row)
                if not any(r["block"] == name and r["deterministic"] == deterministic for r in rows):
                    rows.append({"block": name, "batch": batch, "deterministic": deterministic, "quantity": "all",
                                 "eager_fp32": 0.0, "fused_fp32": 0.0, "fused_vs_eager": 0.0})
        torch.backends.cudnn.deterministic = False
    return rows


def graph_ms(fn, dev) -> float | None:
    return cuda_graph_ms(fn) if dev.type == "cuda" else None


def host_us(fn, dev, calls: int = 200) -> float:
    """Median of 5 runs of `calls` back-to-back calls, host time per call (no sync inside)."""
    out = []
    for _ in range(5):
        _sync(dev)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e6)
        _sync(dev)
    return statistics.median(out)


def speed(dev, blocks, batches, prec: str) -> list[dict]:
    rows = []
    with precision(prec) as dtype, torch.no_grad():
        for batch in batches:
            for name in blocks:
                b = GOOGLENET_INCEPTION[name]
                spec, size = b.spec, b.size
                ref = ReferenceInception(spec).to(dev, dtype).eval().to(memory_format=torch.channels_last)
                fused = FusedInception.from_module(copy.deepcopy(ref), backend="triton")
                x = torch.randn(batch, spec.in_channels, size, size, device=dev, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                want = copy.deepcopy(ref).double()(x.double())
                row = {"block": name, "batch": batch, "precision": prec,
                       "gmacs": spec.macs(size, size, batch).total / 1e9,
                       "fused_error": rel(fused(x), want), "eager_error": rel(ref(x), want)}
                for label, fn in (("fused", lambda: fused(x)), ("eager", lambda: ref(x))):
                    fn()
                    row[f"{label}_bench_ms"] = do_bench_median(fn) if dev.type == "cuda" else None
                    row[f"{label}_graph_ms"] = graph_ms(fn, dev)
                    row[f"{label}_host_us"] = host_us(fn, dev, 50 if dev.type == "cuda" else 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def networks(dev, batch: int, with_compile: bool) -> list[dict]:
    """Whole torchvision networks: bench_networks' contenders (launched from Python; with
    `with_compile`, compile(model) and compile(swap(model)) in bf16), then eager and swapped
    as whole-network CUDA-graph replays, with the logits' error against fp64. fp32 runs
    under PyTorch's default flags (cuDNN convolutions in TF32, matmuls and so our kernels
    exact) and with torch.backends.cuda.matmul.allow_tf32 on (our kernels in TF32 too)."""
    from inception_fast.bench import _NETWORKS, bench_networks
    from inception_fast.swap import swap_inception

    rows = []
    cases = [("torchvision inception_v3", torch.float32, False), ("torchvision inception_v3", torch.float32, True),
             ("torchvision googlenet", torch.bfloat16, None), ("torchvision inception_v3", torch.bfloat16, None)]
    for model, dtype, matmul_tf32 in cases:
        torch._dynamo.reset()
        saved = torch.backends.cuda.matmul.allow_tf32
        if matmul_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        try:
            row = bench_networks([batch], with_compile=with_compile and model == "torchvision googlenet", reps=5,
                                 model=model, device=str(dev), dtype=dtype)[0]
            row["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
            row["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
            make, size = _NETWORKS[model]
            original = make().to(device=dev, dtype=dtype, memory_format=torch.channels_last)
            swapped = swap_inception(copy.deepcopy(original))
            x = torch.randn(batch, 3, size, size, device=dev, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            row["fused_blocks"] = sum(isinstance(m, FusedBranchGraph) for m in swapped.modules())
            with torch.no_grad():
                want = copy.deepcopy(original).double()(x.double())
                row["fused_logits_error"] = rel(swapped(x), want)
                row["eager_logits_error"] = rel(original(x), want)
                row["graph_ms"] = {"eager_channels_last": graph_ms(lambda: original(x), dev),
                                   "fused": graph_ms(lambda: swapped(x), dev)}
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile_host(dev, name: str, batch: int, prec: str, calls: int) -> str:
    b = GOOGLENET_INCEPTION[name]
    with precision(prec) as dtype, torch.no_grad():
        ref = ReferenceInception(b.spec).to(dev, dtype).eval().to(memory_format=torch.channels_last)
        fused = FusedInception.from_module(ref, backend="triton")
        x = torch.randn(batch, b.spec.in_channels, b.size, b.size, device=dev, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        fused(x)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fused(x)
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    return s.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_probe")
    p.add_argument("--dry", action="store_true", help="CPU tiny run under TRITON_INTERPRET=1 (no graphs)")
    p.add_argument("--parts", default=None,
                   help="some of wgrad,speed,profile,networks (default: all; with --dry all but networks)")
    p.add_argument("--compile", action="store_true", help="networks: compile(googlenet) and compile(swap(googlenet))")
    p.add_argument("--batch", type=int, default=32, help="networks' batch")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.dry else "cuda")
    result = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if not args.dry else None}
    t0 = time.perf_counter()
    if args.dry:
        tiny = InceptionSpec(8, 4, 3, 5, 2, 3, 3)
        GOOGLENET_INCEPTION["tiny"] = type(GOOGLENET_INCEPTION["3a"])("tiny", tiny, size=5)
        wblocks, sblocks, batch, batches = ["tiny"], ["tiny"], 2, (1,)
    else:
        wblocks, sblocks, batch, batches = ["4b", "4c", "4e"], list(GOOGLENET_INCEPTION), 33, (32, 256)
    parts = (args.parts or ("wgrad,speed,profile" if args.dry else "wgrad,speed,profile,networks")).split(",")

    def save(part: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {part} done", flush=True)
        (out / "gpu_probe.json").write_text(json.dumps(result, indent=1))

    if "wgrad" in parts:
        result["wgrad"] = wgrad_exactness(dev, wblocks, batch)
        for r in result["wgrad"]:
            print(r, flush=True)
        save("wgrad")
    if "speed" in parts:
        result["speed"] = speed(dev, sblocks, batches, "bf16" if not args.dry else "fp32")
        save("speed")
    if "profile" in parts:
        result["profile"] = profile_host(dev, sblocks[0] if args.dry else "4b", 32 if not args.dry else 1,
                                         "bf16" if not args.dry else "fp32", 300 if not args.dry else 2)
        print(result["profile"], flush=True)
        save("profile")
    if "networks" in parts:
        result["networks"] = networks(dev, args.batch, args.compile)
        save("networks")
    print(f"[{time.perf_counter() - t0:6.1f}s] done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
