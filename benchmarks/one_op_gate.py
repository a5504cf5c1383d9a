"""The speed gate of making the branch graph the only op: GoogLeNet's nine blocks on today's
C++ operator against the GoogLeNet-only kernel it replaced, which lives on in git history.

    git worktree add ../inception_fast-old f3e75d9      # the last commit with both kernels
    (cd ../inception_fast-old && python setup.py build_ext --inplace)
    PYTHONPATH=. python benchmarks/one_op_gate.py ../inception_fast-old/inception_fast/_C*.so [--reps 31]

The old extension loads under another module name (its kernels are pybind functions, no
operators, so the two do not clash). Each is called as the library calls it: the old one
through a Python torch.library custom op, as it was registered then; the new one as
FusedBranchGraph's inference path calls it (ops.branch_graph.graph_forward_inference: the
C++ operator below its Python autograd kernel). Weights are packed once for both, outside the
timed calls. Outputs must be bit-identical; timings alternate old and new (medians of
--reps); the gate asks for no row more than 3% slower and a geomean over the 18
`make bench` rows (batches 1 and 16) that is not lower. The "raw" column calls the old
pybind function directly, without an op.
"""

import argparse
import importlib.util
import math
import statistics

import torch

from inception_fast.bench import time_alternating
from inception_fast.ops.backend import as_gemm_b, pack_panels, panel_width
from inception_fast.ops.branch_graph import graph_forward_inference, pack_weights
from inception_fast.ops.inception import preset
from inception_fast.spec import GOOGLENET_INCEPTION


def load_old(path: str):
    spec = importlib.util.spec_from_file_location("inception_fast_old._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_extension", help="_C*.so built at f3e75d9")
    parser.add_argument("--reps", type=int, default=31)
    args = parser.parse_args()
    old = load_old(args.old_extension)

    @torch.library.custom_op("inception_fast_gate::old_forward", mutates_args=())
    def old_op(x: torch.Tensor, packed: list[torch.Tensor], dims: list[int]) -> torch.Tensor:
        return old.inception_forward(x, *packed, list(dims))

    print("| block | batch | old op ms | new op ms | new/old | old raw ms | new/raw |\n|---|---:|---:|---:|---:|---:|---:|")
    ratios, raw_ratios, identical = [], [], 0
    width = panel_width(torch.float32)
    for name, paper in GOOGLENET_INCEPTION.items():
        s, size = paper.spec, paper.size
        convs = s.to_graph().convs
        w = [torch.randn(c.out_channels, c.in_channels, c.kh, c.kw) / (c.in_channels * c.kh * c.kw) ** 0.5
             for c in convs]
        bias = [torch.rand(c.out_channels) * 0.2 - 0.1 for c in convs]
        w1, w3r, w3, w5r, w5, wp = w
        b1, b3r, b3, b5r, b5, bp = bias
        panels = lambda *ws: pack_panels(torch.cat([as_gemm_b(t) for t in ws], dim=1), width)  # noqa: E731
        packed = [panels(w1, w3r, w5r), torch.cat([b1, b3r, b5r]), panels(w3), b3, panels(w5), b5, panels(wp), bp]
        dims = [s.ch1x1, s.ch3x3red, s.ch5x5red, s.ch3x3, s.ch5x5, s.pool_proj, s.k3, s.k5]
        p = preset(s)
        nb, nbias = pack_weights(p.plan, w, bias, "cpu")
        for batch in (1, 16):
            x = torch.randn(batch, s.in_channels, size, size).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                new = lambda: graph_forward_inference(x, nb, nbias, p.flat)  # noqa: E731
                identical += torch.equal(old_op(x, packed, dims), new())
                t = time_alternating({"old": lambda: old_op(x, packed, dims), "new": new,
                                      "raw": lambda: old.inception_forward(x, *packed, dims)}, reps=args.reps)
            ratios.append(t["new"] / t["old"])
            raw_ratios.append(t["new"] / t["raw"])
            print(f"| {name} | {batch} | {t['old'] * 1e3:.3f} | {t['new'] * 1e3:.3f} | {ratios[-1]:.3f} | "
                  f"{t['raw'] * 1e3:.3f} | {raw_ratios[-1]:.3f} |")
    geomean = lambda r: math.exp(statistics.fmean(map(math.log, r)))  # noqa: E731
    print(f"\nnew/old: geomean {geomean(ratios):.3f}, worst {max(ratios):.3f}; new/raw: geomean "
          f"{geomean(raw_ratios):.3f}, worst {max(raw_ratios):.3f}; bit-identical {identical}/18")


if __name__ == "__main__":
    main()
