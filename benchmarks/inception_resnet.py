"""Inception-ResNet-v2 (timm) on the fused op: its residual blocks Block35, Block17 and Block8
against eager channels_last, and the whole swapped network, forward, float32, CPU.

    PYTHONPATH=. python benchmarks/inception_resnet.py [--batch 1,8] [--reps 25] [--network-batch 4]

Random weights and BN statistics (no download), eval mode, channels_last input; each
block at its grid in the 299x299 network (35, 17, 8). Contenders alternate in one
process; medians of --reps. The swapped network's logits are checked against the
original's first.

Per block, the fused module runs twice: as shipped, with the residual tail as the C++
kernel's last GEMM (x added in its epilogue), and with that switched off, the tail then
running after the op as ATen ops (x's rows plus the scaled bias, addmm_, ReLU in place),
as under autograd.
"""

import argparse
import copy
import importlib
import torch

import inception_fast as ifast
from inception_fast.bench import time_alternating

BLOCKS = {"Block35": (0.17, 320, 35), "Block17": (0.10, 1088, 17), "Block8": (0.20, 2080, 8)}


def randomized(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return module.eval().to(memory_format=torch.channels_last)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--network-batch", type=int, default=4)
    args = parser.parse_args()
    timm = importlib.import_module("timm")
    irv2 = importlib.import_module("timm.models.inception_resnet_v2")
    print("| block | batch | eager CL ms | fused ms | speedup | fused, tail as ATen ops ms | epilogue tail vs ATen tail |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    for batch in map(int, args.batch.split(",")):
        for name, (scale, channels, size) in BLOCKS.items():
            block = randomized(getattr(irv2, name)(scale=scale))
            fused = ifast.FusedBranchGraph.from_module(copy.deepcopy(block)).eval()
            aten_tail = ifast.FusedBranchGraph.from_module(copy.deepcopy(block)).eval()
            aten_tail._residual_flat = None  # the plan without the tail: the ATen tail runs after the op
            x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                t = time_alternating({"eager": lambda: block(x), "fused": lambda: fused(x),
                                      "aten_tail": lambda: aten_tail(x)}, reps=args.reps)
            eager, ours, aten = t["eager"] * 1e3, t["fused"] * 1e3, t["aten_tail"] * 1e3
            print(f"| {name} | {batch} | {eager:.2f} | {ours:.2f} | {eager / ours:.2f}× | {aten:.2f} | {aten / ours:.2f}× |")
    model = randomized(timm.create_model("inception_resnet_v2", pretrained=False))
    swapped = ifast.swap_inception(copy.deepcopy(model))
    fused_blocks = sum(isinstance(m, ifast.FusedBranchGraph) for m in swapped.modules())
    x = torch.randn(args.network_batch, 3, 299, 299).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = model(x), swapped(x)
        err = ((got - want).norm() / want.norm()).item()
        t = time_alternating({"eager": lambda: model(x), "fused": lambda: swapped(x)}, reps=max(3, args.reps // 4))
    eager, ours = t["eager"] * 1e3, t["fused"] * 1e3
    print(f"| inception_resnet_v2, {fused_blocks} blocks fused (logits rel. error {err:.1e}) | {args.network_batch} | "
          f"{eager:.0f} | {ours:.0f} | {eager / ours:.2f}× | | |")


if __name__ == "__main__":
    main()
