"""What returning NCHW to an NCHW caller costs a whole swapped torchvision GoogLeNet.

A fused block returns the memory format eager convolution would (contiguous NCHW for an
NCHW input), so `y.view(n, -1)` works after it; the fused kernels are NHWC inside, so an
NCHW model pays one layout copy per block. This times, alternating, medians of 8:
eager NCHW, the swapped model on NCHW input, and the same with the copy skipped (the
channels_last output of earlier versions), at batch 1 and 16.

    python benchmarks/nchw_layout_cost.py
"""

import copy
import statistics
import time

import torch
import torchvision

import inception_fast as ifast
import inception_fast.fused as fused_module


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    swapped = ifast.swap_inception(copy.deepcopy(model))
    match = fused_module.match_memory_format

    def no_copy(x):
        fused_module.match_memory_format = lambda x, y: y
        try:
            return swapped(x)
        finally:
            fused_module.match_memory_format = match

    print("| batch | eager NCHW ms | swapped, NCHW out ms | swapped, channels_last out ms |\n|---|---:|---:|---:|")
    for batch in (1, 16):
        x = torch.randn(batch, 3, 224, 224)
        providers = {"eager": lambda: model(x), "nchw": lambda: swapped(x), "cl": lambda: no_copy(x)}
        times = {k: [] for k in providers}
        with torch.no_grad():
            for fn in providers.values():
                fn()
            for _ in range(8):
                for k, fn in providers.items():
                    start = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - start)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"| {batch} | {ms['eager']:.1f} | {ms['nchw']:.1f} | {ms['cl']:.1f} |")


if __name__ == "__main__":
    main()
