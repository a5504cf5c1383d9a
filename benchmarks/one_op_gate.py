"""Gate for making the branch graph the only CPU op: on GoogLeNet's nine Inception blocks,
the branch-graph kernels (csrc/inception_graph_cpu*.cpp) against the GoogLeNet-only ones
(csrc/inception_cpu*.cpp) they replace: forward outputs bit-identical (fp32, fp64, batches
1, 8, 32); forward time (fp32); backward gradients within 1e-6 relative (fp32), or, past
that, at least as close as the old kernel's to the old kernel run in fp64 (the old
backward sums some biases less accurately); backward time at batch 32.

    PYTHONPATH=. python benchmarks/one_op_gate.py [--quick] [--reps N]

Timings alternate old and new calls so that both see the same machine noise (median of
--reps each); weights are packed once, outside the timed calls, for both kernels.
"""

import argparse
import math
import statistics
import time

import torch

from inception_fast._extension import require_cpu_extension
from inception_fast.ops.backend import as_gemm_b, pack_panels, panel_width
from inception_fast.ops.branch_graph import pack_weights
from inception_fast.ops.inception import InceptionWeights, preset
from inception_fast.spec import GOOGLENET_INCEPTION

EXACT_BATCHES = (1, 8, 32)
SPEED_BATCHES = (1, 8, 16, 32)
GEOMEAN_BATCHES = (1, 16)  # the rows `make bench` reports (--networks 1,16)
BACKWARD_BLOCKS, BACKWARD_BATCH = ("3a", "4a", "5b"), 32
GRAD_TOLERANCE = 1e-6
GRAD_NAMES = ("x",) + InceptionWeights._fields


def old_packed(w: InceptionWeights) -> list:
    """The weights in the GoogLeNet-only kernel's layout: B panels of [W1 | W3r | W5r], W3, W5, Wp."""
    width = panel_width(w.w1.dtype)
    panels = lambda *ws: pack_panels(torch.cat([as_gemm_b(t) for t in ws], dim=1), width)  # noqa: E731
    return [panels(w.w1, w.w3r, w.w5r), torch.cat([w.b1, w.b3r, w.b5r]), panels(w.w3), w.b3, panels(w.w5), w.b5,
            panels(w.wp), w.bp]


def random_weights(spec, dtype) -> InceptionWeights:
    # Scaled by fan-in and with biases of both signs, so that ReLU keeps about half the outputs.
    return InceptionWeights(*(t for c in spec.to_graph().convs for t in (
        torch.randn(c.out_channels, c.in_channels, c.kh, c.kw, dtype=dtype) / (c.in_channels * c.kh * c.kw) ** 0.5,
        torch.rand(c.out_channels, dtype=dtype) * 0.2 - 0.1)))


class Block:
    """One block with random weights, packed once for both kernels, and the calls to compare."""

    def __init__(self, name, dtype, w=None):
        self.name, paper = name, GOOGLENET_INCEPTION[name]
        self.spec, self.size, self.dtype = paper.spec, paper.size, dtype
        self.w = random_weights(self.spec, dtype) if w is None else w
        p = preset(self.spec)
        self.graph, self.flat = p.plan, p.flat
        self.b, self.bias = pack_weights(self.graph, list(self.w[0::2]), list(self.w[1::2]), "cpu")
        s = self.spec
        self.packed = old_packed(self.w)
        self.dims = [s.ch1x1, s.ch3x3red, s.ch5x5red, s.ch3x3, s.ch5x5, s.pool_proj, s.k3, s.k5]

    def x(self, batch):
        return torch.randn(batch, self.spec.in_channels, self.size, self.size, dtype=self.dtype).contiguous(
            memory_format=torch.channels_last)

    def old(self, x):  # the GoogLeNet-only C++ forward, on weights packed once
        return require_cpu_extension().inception_forward(x, *self.packed, self.dims)

    def new(self, x):
        return torch.ops.inception_fast.graph_forward(x, self.b, self.bias, self.flat)

    def old_backward(self, g, x, y):
        return require_cpu_extension().inception_backward(g, x, y, list(self.w), [True] * 13)

    def saved(self, x):  # (y, the intermediates' interiors) of the graph forward, as BranchGraphFunction saves
        y, buffers = torch.ops.inception_fast.graph_forward_saving(x, self.b, self.bias, self.flat)
        return y, [buf[:, p:p + self.size, p:p + self.size] for buf, p in zip(buffers, self.graph.buf_border)]

    def new_backward(self, g, x, y, inter):
        return torch.ops.inception_fast.graph_backward(g, x, y, inter, list(self.w[0::2]), [True, True],
                                                      self.graph.backward_flat(), "cpu")


def check_gradients(block, g, x, old, new):
    """(passed, worst gradient). Past the tolerance, the old kernel in fp64 tells whose error it is."""
    errs = [rel_err(a, b) for a, b in zip(new, old)]
    worst = max(range(len(errs)), key=errs.__getitem__)
    text, passed = f"{GRAD_NAMES[worst]} {errs[worst]:.2e}", True
    if errs[worst] <= GRAD_TOLERANCE:
        return passed, text
    wide, x64 = Block(block.name, torch.float64, InceptionWeights(*(t.double() for t in block.w))), x.double()
    with torch.no_grad():
        ref = wide.old_backward(g.double(), x64, wide.old(x64))
    for i, err in enumerate(errs):
        if err > GRAD_TOLERANCE:
            e_new, e_old = rel_err(new[i], ref[i]), rel_err(old[i], ref[i])
            passed = passed and e_new <= e_old
            text += f"; {GRAD_NAMES[i]} vs fp64: new {e_new:.1e}, old {e_old:.1e}"
    return passed, text


def alternate(fns, reps):
    """Median seconds of each fn over `reps` rounds; each round calls them all in turn."""
    for fn in fns:  # warm-up: allocator, OpenMP pool, first touch of the packed weights
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def rel_err(got, want):  # as tests/conftest.py: error norm over the reference's norm
    return (got.double() - want.double()).norm().item() / max(want.double().norm().item(), 1e-300)


def check_outputs(names):
    mismatches = 0
    for dtype in (torch.float32, torch.float64):
        for name in names:
            block = Block(name, dtype)
            for batch in EXACT_BATCHES:
                x = block.x(batch)
                with torch.no_grad():
                    old, new = block.old(x), block.new(x)
                if not torch.equal(old, new):
                    mismatches += 1
                    print(f"MISMATCH {name} batch {batch} {dtype}: max |old - new| = {(old - new).abs().max():.3g}")
    print(f"{mismatches} mismatches in {2 * len(names) * len(EXACT_BATCHES)} cases")
    return mismatches


def time_forward(names, reps):
    print(f"\n## forward fp32, median of {reps}\n| block | batch | old ms | new ms | new/old |\n|---|---:|---:|---:|---:|")
    rows = []
    for name in names:
        block = Block(name, torch.float32)
        for batch in SPEED_BATCHES:
            x = block.x(batch)
            with torch.no_grad():
                t_old, t_new = alternate([lambda: block.old(x), lambda: block.new(x)], reps)
            rows.append((name, batch, t_new / t_old))
            print(f"| {name} | {batch} | {t_old * 1e3:.3f} | {t_new * 1e3:.3f} | {t_new / t_old:.3f} |")
    bench_rows = [r for r in rows if r[1] in GEOMEAN_BATCHES]
    geomean = math.exp(statistics.fmean(math.log(r[2]) for r in bench_rows))
    worst = max(bench_rows, key=lambda r: r[2])
    print(f"geomean new/old over the {len(bench_rows)} rows of batches {GEOMEAN_BATCHES}: {geomean:.3f}; "
          f"worst: {worst[0]} at batch {worst[1]} ({worst[2]:.3f})")


def check_backward(names, reps):
    print("| block | batch | worst gradient: rel. err vs old | old ms | new ms | new/old |")
    print("|---|---:|---|---:|---:|---:|")
    failures = 0
    for name in names:
        block = Block(name, torch.float32)
        for batch in (1, 8, BACKWARD_BATCH) if name in BACKWARD_BLOCKS else (1, 8):
            x = block.x(batch)
            with torch.no_grad():
                y, inter = block.saved(x)
                g = torch.randn_like(y)
                old, new = block.old_backward(g, x, y), block.new_backward(g, x, y, inter)
            passed, text = check_gradients(block, g, x, old, new)
            failures += not passed
            timing = "| | |"  # timed at one batch only: the backward is the slow part of the gate
            if batch == BACKWARD_BATCH:
                t_old, t_new = alternate([lambda: block.old_backward(g, x, y),
                                          lambda: block.new_backward(g, x, y, inter)], reps)
                timing = f"{t_old * 1e3:.2f} | {t_new * 1e3:.2f} | {t_new / t_old:.3f} |"
            print(f"| {name} | {batch} | {text}{'' if passed else ' FAIL'} | {timing}")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only 3a, 4a and 5b")
    parser.add_argument("--reps", type=int, default=20, help="timed calls of each kernel per row (median)")
    args = parser.parse_args()
    names = list(BACKWARD_BLOCKS) if args.quick else list(GOOGLENET_INCEPTION)
    torch.manual_seed(0)
    with open("/proc/cpuinfo") as f:  # the machine, so that a pasted table says where it ran
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    print(f"# one-op gate: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\n## outputs: old GoogLeNet forward vs graph_forward, torch.equal")
    mismatches = check_outputs(names)
    time_forward(names, args.reps)
    print(f"\n## backward fp32: old backward vs graph_backward (relative error <= {GRAD_TOLERANCE:g}); "
          f"time at batch {BACKWARD_BATCH}, median of {args.reps}")
    failures = check_backward(names, args.reps)
    ok = mismatches == 0 and failures == 0
    print(f"\ngate: {'PASS' if ok else 'FAIL'} ({mismatches} output mismatches, {failures} gradient failures; "
          "speed is reported, not gated)")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
