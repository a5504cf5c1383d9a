"""Winograd (F(4x4, 3x3) or F(2x2, 3x3), F(2x2, 5x5), F(2, 7), F(2, 3)) against the direct
implicit GEMM, per fused block, fp32 CPU forward.

    PYTHONPATH=. python benchmarks/winograd.py [--models googlenet,fid,irv2,paper] [--batch 1,32] [--reps 11]
        [--baseline direct|f2x2|no5x5] [--convs] [--all-5x5]

Every fused block of each swapped model (torchvision googlenet at 224, pytorch-fid's
InceptionV3 at 299, timm inception_resnet_v2 at 299, the paper's GoogLeNet at 224; random
weights and BN statistics) is
fed the activation it sees inside the network, and its C++ op runs twice on the same
input: with the 3x3, 5x5, 1x7 and 7x1 stride-1 stages packed for Winograd (the default: a 3x3's
tile by its grid, ops/backend.py winograd_3x3_tile) and packed for the baseline: the direct
implicit GEMM (INCEPTION_FAST_WINOGRAD=0's packing), or with --baseline f2x2 every 3x3 as
F(2x2, 3x3) (INCEPTION_FAST_WINOGRAD_3X3=2's; rows without an F(4x4, 3x3) stage are left
out), or with --baseline no5x5 every 5x5 packed for the direct GEMM and the rest as the
default (rows without an F(2x2, 5x5) stage are left out: torchvision's googlenet has none,
its "5x5" branch is a 3x3). --all-5x5 packs every 5x5 for F(2x2, 5x5), also those below
ops/branch_graph.py's WINOGRAD_5X5_MIN_CHANNELS (the measurement that set it). --convs
swaps with convs=True: the stems' lone conv units too. The two alternate in one process;
medians of --reps. Also reported: each one's relative error against the block in float64,
||y - y64|| / ||y64||, and how many of the block's GEMMs run as Winograd stages.
Rows where none does are left out: blocks without such a stage, and calls below
csrc/winograd.h's kMinTiles output tiles (32; 1x3 and 3x1: 64), which run the direct part
of the Winograd panels (GoogLeNet's 7x7 blocks and Inception-v3's 8x8 ones at batch 1).
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

import inception_fast as ifast
from inception_fast.bench import time_alternating
from inception_fast.fused_graph import FusedBranchGraph
from inception_fast.ops import backend as ops_backend
from inception_fast.ops import branch_graph
from inception_fast.ops.branch_graph import graph_forward, winograd_tiles


# csrc/winograd.h, Transform::kMinTiles by filter taps: fewer output tiles in a call run the direct panels
MIN_TILES = {25: 32, 9: 32, 7: 32, 3: 64}


def _models(names: list[str]) -> dict[str, tuple[torch.nn.Module, int]]:
    out = {}
    for name in names:
        if name == "googlenet":
            import torchvision

            out[name] = (torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True), 224)
        elif name == "fid":
            from inception_fast.fid import fid_inception_v3

            out[name] = (fid_inception_v3(), 299)
        elif name == "paper":
            out[name] = (ifast.models.googlenet_paper(aux_logits=False), 224)
        elif name == "irv2":
            import timm

            out[name] = (timm.create_model("inception_resnet_v2", pretrained=False), 299)
        else:
            raise SystemExit(f"--models: unknown model {name!r} (googlenet, fid, irv2, paper)")
    return out


def _random_bn(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _packed(block: FusedBranchGraph, grid: tuple[int, int], winograd: bool = True,
            tile_3x3: int | None = None, direct_5x5: bool = False) -> tuple[list, list, list[int]]:
    """The block's packed weights and flat plan as its CPU inference runs them on an x of
    `grid`, with Winograd off, its 3x3s' tile forced, or its 5x5s packed direct."""
    before = ops_backend.WINOGRAD, ops_backend.WINOGRAD_3X3_TILE
    ops_backend.WINOGRAD, ops_backend.WINOGRAD_3X3_TILE = winograd, tile_3x3 or before[1]
    try:
        block.invalidate_weight_caches()
        block._winograd_flags.clear()
        residual = block._residual_flat is not None
        graph = block._residual_plan if residual else block._plan
        flags = winograd_tiles(graph, *grid)
        if direct_5x5:
            flags = tuple(False if g.kh == 5 else f for g, f in zip(graph.gemms, flags))
        block._winograd_flags[(residual, *grid)] = flags
        b, bias = block._packed("cpu", None, residual, grid)
        return b, bias, block._residual_flat if residual else block._flat_plan
    finally:
        ops_backend.WINOGRAD, ops_backend.WINOGRAD_3X3_TILE = before
        block.invalidate_weight_caches()
        block._winograd_flags.clear()


def _winograd_runs(block: FusedBranchGraph, n: int, h: int, w: int) -> list:
    """(GEMM, tile) of the block's GEMMs that run as Winograd on an (n, h, w) input as the
    default packing has them (winograd_tiles: a 3x3's tile by its grid): those with at least
    kMinTiles output tiles, and not left direct by the policy (a 5x5 below
    WINOGRAD_5X5_MIN_CHANNELS)."""
    runs = []
    for g, flag in zip(block._plan.gemms, winograd_tiles(block._plan, h, w)):
        if not g.winograd or flag is False:
            continue
        th, tw = (flag, flag) if flag in (2, 4) else g.winograd_tile
        gh, gw = g.grid(h, w)
        if n * -(-gh // th) * -(-gw // tw) >= MIN_TILES[g.kh * g.kw]:
            runs.append((g, th))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="googlenet,fid,irv2")  # also: paper
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--baseline", choices=("direct", "f2x2", "no5x5"), default="direct")
    parser.add_argument("--convs", action="store_true", help="also the stems' conv units (swap_inception(convs=True))")
    parser.add_argument("--all-5x5", action="store_true",
                        help="every 5x5 as F(2x2, 5x5), below WINOGRAD_5X5_MIN_CHANNELS too")
    args = parser.parse_args()
    if args.all_5x5:
        branch_graph.WINOGRAD_5X5_MIN_CHANNELS = 0
    torch.manual_seed(0)
    base = args.baseline
    print(f"threads {torch.get_num_threads()}; speedup = {base} time / Winograd time")
    print(f"| model | block | input | batch | Winograd stages | {base} ms | Winograd ms | speedup | err {base} | "
          f"err Winograd |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for name, (model, size) in _models(args.models.split(",")).items():
        swapped = ifast.swap_inception(copy.deepcopy(_random_bn(model)), convs=args.convs).to(
            memory_format=torch.channels_last)
        blocks = [(n, m) for n, m in swapped.named_modules() if isinstance(m, FusedBranchGraph)]
        for batch in (int(b) for b in args.batch.split(",")):
            inputs: dict[str, torch.Tensor] = {}
            hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
                     for n, m in blocks]
            with torch.no_grad():
                swapped(torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last))
            for h in hooks:
                h.remove()
            for block_name, block in blocks:
                x = inputs[block_name]
                n, _, h, w = x.shape
                runs = _winograd_runs(block, n, h, w)
                stages = len(runs)
                if stages == 0 or (base == "f2x2" and all(tile != 4 for _, tile in runs)) or (
                        base == "no5x5" and all(g.kh != 5 for g, _ in runs)):
                    continue
                direct = {"direct": lambda: _packed(block, (h, w), False),
                          "f2x2": lambda: _packed(block, (h, w), tile_3x3=2),
                          "no5x5": lambda: _packed(block, (h, w), direct_5x5=True)}[base]()
                wino = _packed(block, (h, w))
                with torch.no_grad():
                    y64 = copy.deepcopy(block).double()(x.double())
                    ys = [graph_forward(x, *p) for p in (direct, wino)]
                    assert not torch.equal(*ys), f"{block_name}: both packings computed the same output"
                    errs = [((y.double() - y64).norm() / y64.norm()).item() for y in ys]
                    t = time_alternating({"direct": lambda: graph_forward(x, *direct),
                                          "winograd": lambda: graph_forward(x, *wino)}, reps=args.reps)
                ratios.append(t["direct"] / t["winograd"])
                shape = "x".join(str(s) for s in x.shape[1:])
                print(f"| {name} | {block_name} | {shape} | {batch} | {stages} | {t['direct'] * 1e3:.2f} | "
                      f"{t['winograd'] * 1e3:.2f} | {ratios[-1]:.2f}x | {errs[0]:.1e} | {errs[1]:.1e} |", flush=True)
    if ratios:
        print(f"geomean speedup over {len(ratios)} rows: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x")


if __name__ == "__main__":
    main()
