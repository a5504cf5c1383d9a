"""`python -m inception_fast gpu-check`: every Triton path against fp64, then timed, on one GPU.

Runs from a plain checkout (`PYTHONPATH=.`) on whatever torch and triton the machine has;
nothing here needs the C++ extension. Sections, in order (`--sections` picks some):

  googlenet  the nine GoogLeNet blocks at batches 1 and 33: forward, and backward (dx and
             all twelve weight gradients), in fp32 (tf32 off), tf32, fp16 and bf16
  awkward    odd channel counts, K3 = 5, K5 = 3/7, grids 1x1 to 13x13: the same checks
             (in tf32 and fp16 on the 2x5x9 grid only)
  v3         Inception-v3's ten distinct blocks (torchvision InceptionA to E, the grid
             reductions B and D included) and, with timm installed, Inception-ResNet-v2's
             Block35, Block17 and Block8 (with and without its ReLU: the residual tail as
             the last launch's epilogue) at batches 1 and 8: forward, and the fused
             backward's dx and every conv's dW, db (tf32, fp16: one block of each type)
  networks   logits of a swapped torchvision googlenet and inception_v3
  offset     a forward whose x and output pass 2**31 elements (64-bit tile bases)
  launches   kernel launches per call: GoogLeNet 2 forward / 3 backward, v3 one per stage
  speed      triton.testing.do_bench medians: fused against cuDNN eager channels_last and
             torch.compile, per block and whole networks; TFLOP/s against the bf16 mm peak
             measured in the same run; autotune time per problem; per block also both
             as CUDA-graph replays (device time: at batch 32 the host is most of a call)

Every fused call runs once to autotune (while correctness runs, each config is measured
for CORRECTNESS_TUNING_MS only: those sections need a config, not the fastest; the speed
section tunes again), then again with every floating tensor that
torch.empty/empty_like allocate filled with NaN: an element a kernel fails to write stays
NaN, and a NaN never passes. Errors are ||got - ref|| / ||ref|| against an fp64 reference
on the same rounded inputs and weights; limits (TOLERANCE) are fp32 1e-5, tf32 and fp16
5e-3, bf16 2e-2, and in tf32/fp16/bf16 also at most 2x eager PyTorch's own error in that
precision (EAGER_FACTOR; errors under EAGER_FLOOR always pass that second rule). In fp32
the GoogLeNet backward also runs eager fp32: where eager itself misses 1e-5 (the weight
gradients come from cuDNN in both, and cuDNN's fp32 5x5 weight gradient is not exact at
some shapes: 8e-4 on 4b and 4c at batch 33 on an H200), the limit is 2x eager's error.

Backward data: a ReLU's gradient jumps where its input crosses 0, so two computations
that round differently disagree by whole gradient elements wherever an input lies within
rounding of 0; at batch 33 that happens somewhere, whatever the precision. So the
GoogLeNet backward runs on dyadic data (x, grad_output in {-1, 0, 1}, weights in
{-2..2}/8), on which every forward sum is exact in fp32, tf32 and fp16 and both sides
see the same masks and max-pool ties: fp32 end to end through autograd against fp64
autograd; tf32/fp16/bf16 from the same saved x, y, intermediates and grad_output against
the fp64 (and, for the eager rule, the same-precision) ATen twin `graph_backward_reference`.
The v3 backward runs on random data from the same saved tensors against that twin; its
module path is checked end to end for finite gradients of every parameter.

Output: DIR/gpu_check.json (everything) and DIR/gpu_check.md (summary tables), rewritten
after every section (and case, 15 s after the last write) so that a run stopped early
leaves what it had. Exit status: 0 all
checks passed, 1 any check failed, 2 no GPU (or bad arguments).

Modes: full (timing stops before `time_limit`, 510 s by default, to end under 9 min),
--quick (fewer cases, no torch.compile, timing stops at 210 s), --tiny (the CPU self-test
under TRITON_INTERPRET=1 in `make test`: tiny specs, batch 1-2, fp32, 1-rep timing).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .bench import (V3_BLOCKS, CaseResult, _compiled, _inception_v3, bench_networks, device_peak_tflops, do_bench_median,
                    gemm_ceiling, time_alternating)
from .fused import FusedInception
from .reference import ReferenceInception
from .spec import GOOGLENET_INCEPTION, InceptionSpec
from .verify import _error

__all__ = ["SECTIONS", "TOLERANCE", "EAGER_FACTOR", "GpuCheck", "brief_autotuning", "check_device", "count_launches",
           "cuda_graph_ms", "make_plan", "poisoned_allocations", "precision"]

SECTIONS = ("googlenet", "awkward", "v3", "networks", "offset", "launches", "speed")

# ||got - ref|| / ||ref|| against fp64 (tests/conftest.py's table, plus tf32).
TOLERANCE = {"fp32": 1e-5, "tf32": 5e-3, "fp16": 5e-3, "bf16": 2e-2}
EAGER_FACTOR = 2.0  # reduced precision: also at most this times eager PyTorch's own error
EAGER_FLOOR = 1e-6  # both at rounding level: the eager rule says nothing there
NETWORK_FP32_TOLERANCE = 1e-4  # whole-network logits in fp32 (the stem's rounding adds up)
# do_bench warm-up and measurement (ms) per config while the correctness sections autotune:
# they need a config, not the fastest; the speed section tunes again with the kernels' own 5 + 20.
CORRECTNESS_TUNING_MS = (1, 4)
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The fused backward's gradients that come from cuDNN's convolution_backward, as in eager:
# the K x K convolutions' weights (graph_backward_reference; the 1x1s' are GEMMs).
_CUDNN_WEIGHT_GRADS = ("dw3", "dw5")
_GRAD_NAMES = ("dx", "dw1", "db1", "dw3r", "db3r", "dw3", "db3", "dw5r", "db5r", "dw5", "db5", "dwp", "dbp")

# Channel counts that are not multiples of any block size, K5 = 3 and 7, K3 = 5 (as the
# interpreter tests), and their (batch, H, W).
AWKWARD_SPECS = {
    "odd": InceptionSpec(13, 5, 7, 9, 3, 11, 6),
    "k5=3": InceptionSpec(20, 17, 33, 35, 4, 19, 21, k5=3),
    "k3=5,k5=7": InceptionSpec(37, 40, 24, 33, 8, 47, 1, k3=5, k5=7),
}
AWKWARD_SIZES = ((1, 1, 1), (3, 7, 7), (1, 13, 13), (2, 5, 9))

# The 2**31 case: bf16, 28x28, 256 input and 264 output channels; enough images that
# the last one starts past OFFSET_ELEMENTS elements of x (and of the output): ~4.4 GB each.
OFFSET_SPEC = InceptionSpec(256, 8, 8, 8, 8, 8, 240)
OFFSET_SIZE = 28
OFFSET_ELEMENTS = 2**31

# One Inception-v3 block of each type: A, B (grid reduction), C, D (grid reduction), E.
V3_FIRST_OF_EACH = ("Mixed_5b", "Mixed_6a", "Mixed_6b", "Mixed_7a", "Mixed_7b", "Conv2d_2a_3x3", "Conv2d_2b_3x3",
                    "Block35", "Block8_no_relu")
# Inception-v3's stem conv units that swap_inception(convs=True) fuses, with their input grids:
# an unpadded 3x3 (the VALID slot), a 'same' 3x3 straight over x, an unpadded 3x3 over 80.
V3_STEM_UNITS = {"Conv2d_2a_3x3": 149, "Conv2d_2b_3x3": 147, "Conv2d_4a_3x3": 73}


# -- plans ---------------------------------------------------------------------------------


@dataclass
class SpeedPlan:
    blocks: list[tuple[str, InceptionSpec, int]]  # (name, spec, H = W)
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    networks: list[tuple[str, int]]  # (bench._NETWORKS name, batch), timed in bf16 on GPUs
    compile: bool  # torch.compile (inductor, freezing) as a peer
    reps: int  # time_alternating reps: one do_bench round per 5
    peak_size: int  # the bf16 mm peak's n (n^3 multiply-adds)


@dataclass
class Plan:
    mode: str
    googlenet: list[tuple[str, InceptionSpec, int]]  # (name, spec, H = W), each at every batch and precision
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    # (label, spec, (N, H, W), precisions)
    awkward: list[tuple[str, InceptionSpec, tuple[int, int, int], tuple[str, ...]]]
    # (block names, None for all; batches; precisions): Inception-v3 blocks by bench.V3_BLOCKS name
    v3: list[tuple[tuple[str, ...] | None, tuple[int, ...], tuple[str, ...]]]
    network_precisions: tuple[str, ...]
    offset: bool
    speed: SpeedPlan
    time_limit_s: float | None
    # v3 block kinds (_block_kind) whose module path is also run end to end through
    # autograd, and whose launches are counted
    v3_module_types: tuple[str, ...] = ("A", "B", "C", "D", "E", "Block35", "Block17", "Block8", "ResidualBlock")
    v3_launch_types: tuple[str, ...] = ("A", "B", "C", "D", "E", "Block35", "Block17", "Block8", "ResidualBlock")


def make_plan(mode: str) -> Plan:
    """The cases of a mode: "full", "quick" or "tiny" (see the module docstring).

    Every new problem shape compiles and autotunes each config of its kernels, which is
    most of the correctness sections' time on a GPU: the tile-edge cases (awkward) and v3
    run in tf32 and fp16 at one size each, in fp32 and bf16 at all.
    """
    blocks = [(name, b.spec, b.size) for name, b in GOOGLENET_INCEPTION.items()]
    some = ("fp32", "bf16")
    awkward = [(f"{name} n={n} {h}x{w}", spec, (n, h, w), PRECISIONS if (n, h, w) == (2, 5, 9) else some)
               for name, spec in AWKWARD_SPECS.items() for n, h, w in AWKWARD_SIZES]
    if mode == "full":
        speed = SpeedPlan(blocks, (1, 32, 256), ("bf16", "tf32"), [("torchvision googlenet", 32),
                          ("torchvision inception_v3", 32)], compile=True, reps=10, peak_size=8192)
        v3 = [(None, (1, 8), some), (V3_FIRST_OF_EACH, (8,), ("tf32", "fp16"))]
        return Plan(mode, blocks, (1, 33), PRECISIONS, awkward, v3, some, offset=True, speed=speed,
                    time_limit_s=510.0)
    if mode == "quick":
        three = [b for b in blocks if b[0] in ("3a", "4b", "5b")]  # 28x28, r5 = 24, 7x7
        speed = SpeedPlan(blocks, (32, 256), ("bf16",), [("torchvision googlenet", 32)], compile=False, reps=5,
                          peak_size=8192)
        quick_awkward = [(label, spec, size, some if size == (2, 5, 9) else ("fp32",))
                         for label, spec, size, _ in awkward if size in ((1, 1, 1), (2, 5, 9))]
        return Plan(mode, three, (1, 33), some, quick_awkward, [(V3_FIRST_OF_EACH, (2,), some)], ("fp32",),
                    offset=True, speed=speed, time_limit_s=210.0)
    if mode == "tiny":
        tiny = [("tiny", AWKWARD_SPECS["odd"], 5)]
        speed = SpeedPlan(tiny, (1,), ("fp32",), [], compile=False, reps=1, peak_size=128)
        return Plan(mode, tiny, (1, 2), ("fp32",), [(label, spec, size, ("fp32",)) for label, spec, size, _ in awkward
                                                      if label == "k5=3 n=1 1x1"],
                    [(None, (1,), ("fp32",))], ("fp32",), offset=False, speed=speed, time_limit_s=None,
                    v3_module_types=("E", "Block35", "ResidualBlock"), v3_launch_types=("A", "Block35", "ResidualBlock"))
    raise ValueError(f"mode must be 'full', 'quick' or 'tiny', got {mode!r}")


# -- instruments -----------------------------------------------------------------------------


@contextlib.contextmanager
def precision(mode: str):
    """Yield the dtype of a precision mode with tf32 math on for "tf32" only, in cuBLAS,
    cuDNN and (through torch.backends.cuda.matmul.allow_tf32) the Triton kernels."""
    import warnings

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; the kernels read this flag
        matmul.allow_tf32 = cudnn.allow_tf32 = mode == "tf32"
    try:
        yield _DTYPE[mode]
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.allow_tf32, cudnn.allow_tf32 = saved


@contextlib.contextmanager
def poisoned_allocations():
    """Inside, every floating tensor from torch.empty / torch.empty_like is NaN-filled, so
    an element that a kernel should write and does not shows up as NaN. NaN is as valid
    as any garbage torch.empty may return: correct code cannot tell."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


@contextlib.contextmanager
def count_launches():
    """Yield a list that collects the name of every Triton kernel launched inside (the
    JITFunction, or under TRITON_INTERPRET=1 the InterpretedFunction, `run` method)."""
    from .ops import triton_gemm

    cls = type(triton_gemm.mma)  # a jit function: JITFunction, or InterpretedFunction
    own = "run" in cls.__dict__
    real_run = cls.run
    names: list[str] = []

    def run(self, *args, **kwargs):
        names.append(getattr(getattr(self, "fn", None), "__name__", repr(self)))
        return real_run(self, *args, **kwargs)

    cls.run = run
    try:
        yield names
    finally:
        if own:
            cls.run = real_run
        else:
            del cls.run


def _backward_launches(plan) -> list[str]:
    """The Triton launches of graph_backward_triton for a plan, in the order of its walk
    (convolutions in reverse): one data-gradient kernel per stride-1 convolution over an
    intermediate, the max-pool branch's pool-gradient kernel, and, with a max-pool branch,
    the shared-x dx GEMM that gathers its gradient (needs = x and weights)."""
    from .ops.plan import Source

    names = ["_graph_pool_grad_kernel" if c.source == Source.MAX_POOL else "_graph_dgrad_kernel"
             for c in reversed(plan.convs) if c.source == Source.MAX_POOL or (c.source >= 0 and c.stride == 1)]
    return names + (["_graph_input_grad_kernel"] if "_graph_pool_grad_kernel" in names else [])


@contextlib.contextmanager
def brief_autotuning(warmup_ms: float, rep_ms: float):
    """Inside, triton.testing.do_bench (which the kernels' autotuning imports at each use)
    measures for at most warmup_ms + rep_ms: the same configs are compiled and run, sooner."""
    import triton.testing

    real = triton.testing.do_bench

    def brief(fn, warmup=25, rep=100, *args, **kwargs):
        return real(fn, min(warmup, warmup_ms), min(rep, rep_ms), *args, **kwargs)

    triton.testing.do_bench = brief
    try:
        yield
    finally:
        triton.testing.do_bench = real


def cuda_graph_ms(fn: Callable[[], object]) -> float:
    """Median ms of fn captured once as a CUDA graph and replayed (triton.testing.do_bench):
    device time without the host's launch overhead, which at small batches is most of a
    call from Python (an H200's host took ~0.2-0.3 ms a GoogLeNet block). Warmed up on a
    side stream first, as capture requires (and so that no autotuning happens inside it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench_median(graph.replay)


def cuda_kernel_count(fn: Callable[[], object]) -> int | None:
    """CUDA kernels (memcpy/memset left out) that fn launches, by torch.profiler; None off
    CUDA or where the profiler fails."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset")))
    except Exception:  # noqa: BLE001  (a profiler problem is no kernel problem)
        return None


def _dyadic(shape, device, dtype=torch.float64, low: int = -1, high: int = 2, scale: float = 1.0) -> torch.Tensor:
    """Small integers (times scale): exact in every float format, and so are their sums here."""
    return (torch.randint(low, high, tuple(shape), device=device).to(torch.float64) * scale).to(dtype)


def _dyadic_(module: nn.Module) -> nn.Module:
    """Every weight and bias in {-2, ..., 2} / 8 (see the module docstring, "Backward data")."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(_dyadic(p.shape, p.device, p.dtype, -2, 3, 1 / 8))
    return module


class ResidualBlock(nn.Module):
    """An Inception-ResNet block (Szegedy et al., 2016, "Inception-v4, Inception-ResNet and
    the Impact of Residual Connections") without timm: branches of conv + BN + ReLU units,
    each unit (out channels, kh, kw) with 'same' padding, concatenated, then
    act(x + scale * (1x1 conv with bias)(concat)), act ReLU or none. What swap_inception
    sees is the structure (graph_parse.py), so it fuses as timm's Block35/17/8 do."""

    def __init__(self, channels: int, branches: list[list[tuple[int, int, int]]], scale: float, relu: bool = True):
        super().__init__()

        def unit(cin: int, cout: int, kh: int, kw: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, (kh, kw), padding=(kh // 2, kw // 2), bias=False),
                                 nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU())

        self.branches = nn.ModuleList()
        for units in branches:
            cins = [channels] + [cout for cout, _, _ in units[:-1]]
            self.branches.append(nn.Sequential(*(unit(cin, cout, kh, kw) for cin, (cout, kh, kw) in zip(cins, units))))
        self.conv2d = nn.Conv2d(sum(units[-1][0] for units in branches), channels, 1)
        self.scale, self.relu = scale, nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat([branch(x) for branch in self.branches], 1)) * self.scale + x
        return self.relu(out) if self.relu is not None else out


def _block_kind(block: nn.Module) -> str:
    """A torchvision InceptionA-E's letter, else the class name (BasicConv2d, Block35, ...)."""
    name = type(block).__name__
    return name[-1] if name.startswith("Inception") else name


def _narrow(block: nn.Module, in_channels: int, factor: int) -> nn.Module:
    """A torchvision Inception-v3 block with every conv's width divided by `factor` (the
    block's input channels kept), in place: its forward only reads its children, so it stays
    the same graph, small enough for the interpreter. No internal width may equal in_channels."""
    from torchvision.models.inception import BasicConv2d

    def width(c: int) -> int:
        return c if c == in_channels else max(1, c // factor)

    for name, unit in list(block.named_children()):
        if isinstance(unit, BasicConv2d):
            conv = unit.conv
            setattr(block, name, BasicConv2d(width(conv.in_channels), width(conv.out_channels),
                                             kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding))
    return block


def versions(device: torch.device) -> dict:
    """Python, torch, triton, torchvision, CUDA, cuDNN and the GPU (name, capability, SMs, memory)."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    for name in ("triton", "torchvision", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "capability": "%d.%d" % torch.cuda.get_device_capability(device),
                 "sms": props.multi_processor_count, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Check:
    """One compared quantity: error = ||got - want|| / ||want|| (NaN when got has NaN)."""

    section: str
    case: str
    precision: str
    quantity: str
    error: float | None
    limit: float | None
    eager_error: float | None = None
    ok: bool = False
    note: str = ""


class GpuCheck:
    """One run: plan, sections, records, and the two output files."""

    def __init__(self, mode: str, out: Path, device: torch.device, sections=SECTIONS,
                 time_limit_s: float | None = None, log: Callable[[str], None] | None = None):
        self.plan = make_plan(mode)
        if time_limit_s is not None:
            self.plan.time_limit_s = time_limit_s
        self.out = Path(out)
        self.device = device
        self.sections = tuple(sections)
        self.start = time.perf_counter()
        self._log = log
        self.checks: list[Check] = []
        self.launches: list[dict] = []
        self.speed: dict = {"blocks": [], "networks": []}
        self.skipped: list[dict] = []
        self.errors: list[dict] = []  # exceptions with tracebacks (each also a failed Check, or a skip)
        self.section_s: dict[str, float] = {}
        self._spent: dict[str, list[float]] = {}
        self._written = time.perf_counter()
        self.info = versions(device)

    # -- bookkeeping ------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        (self._log or (lambda s: print(s, file=sys.stderr, flush=True)))(line)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append({"what": what, "why": why})
        self.log(f"skipped {what}: {why}")

    def time_allows(self, kind: str, what: str, estimate_s: float) -> bool:
        """Whether a timing unit of `kind` still ends inside the time limit, estimated by the
        slowest of the last three of its kind (estimate_s before any); records the skip if
        not. Correctness never asks."""
        limit = self.plan.time_limit_s
        if limit is None:
            return True
        estimate = max(self._spent.get(kind, [estimate_s])[-3:])  # adapts once warm-ups are past
        if self.elapsed() + estimate <= limit:
            return True
        self.skip(what, f"time limit ({self.elapsed():.0f} s spent, ~{estimate:.0f} s more > {limit:.0f} s)")
        return False

    @contextlib.contextmanager
    def timed(self, kind: str):
        t = time.perf_counter()
        yield
        self._spent.setdefault(kind, []).append(time.perf_counter() - t)

    @property
    def autotunes(self) -> bool:
        """Whether a new problem's first call autotunes (CUDA), so that only a second call
        runs into poisoned memory; the interpreter takes each list's first config."""
        return self.device.type == "cuda"

    def warm(self, fn: Callable[[], object]) -> None:
        if self.autotunes:
            fn()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compare(self, section: str, case: str, prec: str, quantity: str, got, want, eager=None,
                limit: float | None = None, absolute: bool = True, cudnn_fp32: bool = False) -> Check:
        """Record got against the fp64 want: error <= limit (TOLERANCE[prec] by default; none
        without `absolute`) and, given eager's result in the same precision, <= EAGER_FACTOR x
        eager's error (in fp32 only without `absolute`: exact fp32 may beat eager by any
        factor). `cudnn_fp32` marks an fp32 quantity that the fused backward takes from the
        same cuDNN call as eager (a K x K weight gradient): where eager itself misses the
        limit, by no more than a TF32-sized error, it is held to EAGER_FACTOR x eager's."""
        limit = (TOLERANCE[prec] if limit is None else limit) if absolute else None
        if got is None:
            check = Check(section, case, prec, quantity, None, limit, ok=False, note="no result")
            self.checks.append(check)
            return check
        err = _error(quantity, got, want).rel
        eager_err = _error(quantity, eager, want).rel if eager is not None else None
        note = "" if math.isfinite(err) else "NaN or inf: an element was not written, or a NaN leaked"
        if (cudnn_fp32 and prec == "fp32" and eager_err is not None and limit is not None
                and limit < eager_err <= TOLERANCE["tf32"]):
            # The quantity comes from the same cuDNN/cuBLAS call as in eager, and that call's
            # own fp32 algorithm misses the exact-fp32 limit (cuDNN's 5x5 weight gradient does
            # at some shapes: its FFT/Winograd algorithms are not exact): held to eager's error.
            limit = EAGER_FACTOR * eager_err  # the limit in force, as the tables show it
            ok = math.isfinite(err) and err <= limit
            note = note or f"eager fp32 itself has {eager_err:.1e} here (cuDNN's algorithm): held to {EAGER_FACTOR:g}x that"
        else:
            ok = math.isfinite(err) and (limit is None or err <= limit)
            if eager_err is not None and (prec != "fp32" or limit is None):
                ok = ok and (err <= EAGER_FACTOR * eager_err or err <= EAGER_FLOOR)
        check = Check(section, case, prec, quantity, err, limit, eager_err, ok, note)
        self.checks.append(check)
        return check

    @contextlib.contextmanager
    def case(self, section: str, case: str, prec: str = "-", counts: bool = True):
        """One case: a fresh, reproducible random stream; an exception is a failed check, or
        with `counts` False (a peer's setup, such as torch.compile) a skip that says why."""
        torch.manual_seed(zlib.crc32(f"{section}/{case}/{prec}".encode()))
        before = sum(not c.ok for c in self.checks)
        try:
            yield
        except Exception as exc:  # noqa: BLE001  (one broken case must not hide the others)
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self.errors.append({"section": section, "case": case, "precision": prec,
                                "traceback": traceback.format_exc()[-4000:]})
            if counts:
                self.checks.append(Check(section, case, prec, "exception", None, None, ok=False, note=message[:300]))
            else:
                self.skip(f"{section} {case} {prec}", message[:300])
        failed = sum(not c.ok for c in self.checks) - before
        if failed:
            self.log(f"FAIL {section} {case} {prec}: {failed} check(s)")
        if time.perf_counter() - self._written > 15:  # a run killed mid-section keeps what it had
            self.write()

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    # -- driver -----------------------------------------------------------------------

    def run(self) -> bool:
        self.log(f"gpu-check {self.plan.mode} on {self.info.get('gpu', self.info.get('cpu'))}: torch "
                 f"{self.info['torch']}, triton {self.info['triton']}; sections {', '.join(self.sections)}")
        for name in SECTIONS:
            if name not in self.sections:
                continue
            t = time.perf_counter()
            self.log(f"== {name}")
            brief = name != "speed" and self.autotunes
            try:
                with brief_autotuning(*CORRECTNESS_TUNING_MS) if brief else contextlib.nullcontext():
                    getattr(self, f"_section_{name}")()
            except Exception:  # noqa: BLE001  (a section's own setup failed: record, go on)
                with self.case(name, "section setup"):
                    raise
            self.section_s[name] = round(time.perf_counter() - t, 1)
            self.write()
        failed = sum(not c.ok for c in self.checks)
        self.log(f"{'PASS' if self.ok else 'FAIL'}: {len(self.checks) - failed}/{len(self.checks)} checks passed; "
                 f"wrote {self.out / 'gpu_check.json'} and gpu_check.md")
        return self.ok

    # -- GoogLeNet blocks ---------------------------------------------------------------

    def _section_googlenet(self) -> None:
        for name, spec, size in self.plan.googlenet:
            for batch in self.plan.batches:
                for prec in self.plan.precisions:
                    self._inception_case("googlenet", f"{name} n={batch}", spec, (batch, size, size), prec)

    def _section_awkward(self) -> None:
        for label, spec, size, precs in self.plan.awkward:
            for prec in precs:
                self._inception_case("awkward", label, spec, size, prec)

    def _inception_case(self, section: str, label: str, spec: InceptionSpec, size, prec: str) -> None:
        n, h, w = size
        dev = self.device
        with self.case(section, label, prec), precision(prec) as dtype, torch.no_grad():
            self.log(f"{section} {label} {prec}")
            # Forward: random data; the fp64 reference runs on the same rounded x and weights.
            ref = ReferenceInception(spec).to(dev, dtype).eval()
            fused = FusedInception.from_module(copy.deepcopy(ref), backend="triton")
            x = torch.randn(n, spec.in_channels, h, w, device=dev).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            want = copy.deepcopy(ref).double()(x.double())
            self.warm(lambda: fused(x))
            with poisoned_allocations():
                got = fused(x)
            eager = None if prec == "fp32" else copy.deepcopy(ref).to(memory_format=torch.channels_last)(x)
            self.compare(section, label, prec, "forward", got, want, eager)
            self._inception_backward(section, label, spec, size, prec, dtype)

    def _inception_backward(self, section, label, spec, size, prec, dtype) -> None:
        from .ops.branch_graph import graph_backward_reference, graph_triton_forward_saving, pack_weights
        from .ops.branch_graph_triton import graph_backward_triton
        from .ops.inception import InceptionWeights, preset

        n, h, w = size
        dev = self.device
        ref = _dyadic_(ReferenceInception(spec).to(dev, dtype))
        x = _dyadic((n, spec.in_channels, h, w), dev, dtype).contiguous(memory_format=torch.channels_last)
        grad = _dyadic((n, spec.out_channels, h, w), dev, dtype).contiguous(memory_format=torch.channels_last)
        if prec == "fp32":
            # End to end through autograd (InceptionFunction, the custom op, the Triton backward).
            ref64 = copy.deepcopy(ref).double().train()
            x64 = x.double().requires_grad_()
            with torch.enable_grad():
                ref64(x64).backward(grad.double())
            want = [x64.grad, *(p.grad for p in ref64.parameters())]
            # Eager fp32 on the same data: the fused backward's weight gradients are cuDNN's,
            # as eager's are, so eager's error says what cuDNN's fp32 algorithm gives here.
            eager_ref = copy.deepcopy(ref).to(memory_format=torch.channels_last).train()
            xe = x.clone().requires_grad_()
            with torch.enable_grad():
                eager_ref(xe).backward(grad)
            eager = [xe.grad, *(p.grad for p in eager_ref.parameters())]
            fused = FusedInception.from_module(ref, backend="triton").train()
            got = None
            for poisoned in (False, True) if self.autotunes else (True,):  # the first call autotunes
                fused.zero_grad(set_to_none=True)
                xg = x.clone().requires_grad_()
                with torch.enable_grad(), (poisoned_allocations() if poisoned else contextlib.nullcontext()):
                    fused(xg).backward(grad)
                got = [xg.grad, *(p.grad for p in fused.parameters())]
            for name, g, wnt, e in zip(_GRAD_NAMES, got, want, eager):
                self.compare(section, label, prec, name, g, wnt, e, cudnn_fp32=name in _CUDNN_WEIGHT_GRADS)
            return
        # Reduced precision: the same saved x, y, intermediates and grad_output for all three.
        p = preset(spec)
        weights = InceptionWeights(*(t.detach() for t in ref.parameters()))
        b, bias = pack_weights(p.plan, weights.weights, weights.biases, "triton")
        y, inter = graph_triton_forward_saving(x, b, bias, p.flat)
        needs = [True, True]
        self.warm(lambda: graph_backward_triton(grad, x, y, inter, weights.weights, needs, p.backward_flat))
        with poisoned_allocations():
            got = graph_backward_triton(grad, x, y, inter, weights.weights, needs, p.backward_flat)
        want = graph_backward_reference(grad.double(), x.double(), y.double(), [t.double() for t in inter],
                                        [t.double() for t in weights.weights], needs, p.backward_flat)
        twin = graph_backward_reference(grad, x, y, inter, weights.weights, needs, p.backward_flat)
        for name, g, wnt, e in zip(_GRAD_NAMES, got, want, twin):
            self.compare(section, label, prec, name, g, wnt, e)

    # -- Inception-v3 blocks ----------------------------------------------------------

    def _v3_blocks(self) -> list[tuple[str, str, nn.Module, tuple[int, int]]] | None:
        """(name, label, block in eval mode with random BN statistics, input H x W), or None
        without torchvision; Inception-ResNet-v2's residual blocks too where timm is installed."""
        try:
            from torchvision.models import inception as tv
        except ImportError:
            return None
        from .cli import _randomize_bn_

        if self.plan.mode == "tiny":  # torchvision's classes and forwards, 1/8 of the widths, a 5x9 grid
            small = {"A": tv.InceptionA(24, pool_features=8), "B": tv.InceptionB(24),
                     "C": tv.InceptionC(24, channels_7x7=16), "D": tv.InceptionD(24), "E": tv.InceptionE(24)}
            return [(k, f"Inception{k} (1/8 wide)", _randomize_bn_(_narrow(block, 24, 8)).eval(), (5, 9))
                    for k, block in small.items()] + [
                ("stem", "stem unit (unpadded 3x3, 4 -> 6)", _randomize_bn_(tv.BasicConv2d(4, 6, kernel_size=3)).eval(),
                 (5, 9))] + self._residual_blocks()[:1]
        model = _randomize_bn_(_inception_v3())
        return [(n, f"{n} ({type(getattr(model, n)).__name__[-1]})", getattr(model, n), (V3_BLOCKS[n],) * 2)
                for n in V3_BLOCKS] + [(n, f"{n} (stem unit)", getattr(model, n), (size,) * 2)
                                       for n, size in V3_STEM_UNITS.items()] + self._residual_blocks()

    def _residual_blocks(self) -> list[tuple[str, str, nn.Module, tuple[int, int]]]:
        """Inception-ResNet-v2's Block35 (35x35), Block17 (17x17) and Block8 with and
        without its ReLU (8x8; the tiny mode takes Block35 on 5x9), as _v3_blocks lists
        them: timm's, or where timm is not installed (a GPU machine's image) the same
        shapes built here (ResidualBlock). Their inference runs the tail as the residual
        epilogue."""
        import importlib

        from .cli import _randomize_bn_

        where = "Inception-ResNet-v2"
        try:  # the module: timm.models' attribute of that name is the model's factory
            irv2 = importlib.import_module("timm.models.inception_resnet_v2")
            made = (irv2.Block35(scale=0.17), irv2.Block17(scale=0.10), irv2.Block8(scale=0.20),
                    irv2.Block8(no_relu=True))
        except ImportError:
            where += ", without timm"
            made = (ResidualBlock(320, [[(32, 1, 1)], [(32, 1, 1), (32, 3, 3)], [(32, 1, 1), (48, 3, 3), (64, 3, 3)]],
                                  0.17),
                    ResidualBlock(1088, [[(192, 1, 1)], [(128, 1, 1), (160, 1, 7), (192, 7, 1)]], 0.10),
                    ResidualBlock(2080, [[(192, 1, 1)], [(192, 1, 1), (224, 1, 3), (256, 3, 1)]], 0.20),
                    ResidualBlock(2080, [[(192, 1, 1)], [(192, 1, 1), (224, 1, 3), (256, 3, 1)]], 1.0, relu=False))
        blocks = [(name, block, size) for name, block, size in zip(
            ("Block35", "Block17", "Block8", "Block8_no_relu"), made, (35, 17, 8, 8))]
        grid = (lambda size: (5, 9)) if self.plan.mode == "tiny" else (lambda size: (size, size))  # noqa: E731
        return [(name, f"{name} ({where})", _randomize_bn_(block).eval(), grid(size))
                for name, block, size in blocks]

    def _section_v3(self) -> None:
        blocks = self._v3_blocks()
        if blocks is None:
            self.skip("v3 section", "torchvision is not installed")
            return
        for names, batches, precs in self.plan.v3:
            for name, label, block, (h, w) in blocks:
                if names is not None and name not in names:
                    continue
                for batch in batches:
                    for prec in precs:
                        self._v3_case(f"{label} n={batch}", block, (batch, h, w), prec)

    def _v3_case(self, label: str, block: nn.Module, size, prec: str) -> None:
        from .blocks import fold_conv_bn
        from .fused_graph import FusedBranchGraph
        from .ops.branch_graph import graph_backward_reference, graph_triton_forward_saving
        from .ops.branch_graph_triton import graph_backward_triton

        n, h, w = size
        dev = self.device
        with self.case("v3", label, prec), precision(prec) as dtype:
            self.log(f"v3 {label} {prec}")
            block = copy.deepcopy(block).to(dev, dtype).eval()
            fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton").eval()
            x = torch.randn(n, fused.spec.in_channels, h, w, device=dev).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                want = copy.deepcopy(block).double()(x.double())
                self.warm(lambda: fused(x))
                with poisoned_allocations():
                    got = fused(x)
                eager = None if prec == "fp32" else copy.deepcopy(block).to(memory_format=torch.channels_last)(x)
            self.compare("v3", label, prec, "forward", got, want, eager)

            # Backward from the same saved x, y, intermediates and grad_output, of the fused
            # op alone (a residual block's tail runs as ATen ops under autograd).
            with torch.no_grad():
                b, bias = fused._packed("triton", None)
                y, inter = graph_triton_forward_saving(x, b, bias, fused._plan.flat())
                weights = [fold_conv_bn(u)[0] for u in fused._units][:fused._op_convs]
            grad = torch.randn(y.shape, device=dev).to(dtype)
            plan = fused._plan.backward_flat()
            self.warm(lambda: graph_backward_triton(grad, x, y, inter, weights, [True, True], plan))
            with poisoned_allocations():
                got = graph_backward_triton(grad, x, y, inter, weights, [True, True], plan)
            want = graph_backward_reference(grad.double(), x.double(), y.double(), [t.double() for t in inter],
                                             [t.double() for t in weights], [True, True], plan)
            twin = None
            if prec != "fp32":
                twin = graph_backward_reference(grad, x, y, inter, weights, [True, True], plan)
            names = ["dx"] + [f"{kind}[{i}]" for i in range(len(weights)) for kind in ("dW", "db")]
            for i, (name, g, wnt) in enumerate(zip(names, got, want)):
                self.compare("v3", label, prec, name, g, wnt, None if twin is None else twin[i])

            if prec == "fp32" and _block_kind(block) in self.plan.v3_module_types:
                # The module path end to end: every parameter gets a finite gradient.
                module = FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton").eval()
                xg = x.clone().requires_grad_()
                with poisoned_allocations():
                    out = module(xg)
                    out.backward(torch.randn_like(out))
                grads = [xg.grad, *(p.grad for p in module.parameters())]
                bad = sum(g is None or not bool(torch.isfinite(g).all()) for g in grads)
                note = f"{bad} of {len(grads)} missing or not finite" if bad else ""
                self.checks.append(Check("v3", label, prec, "module backward: every gradient finite", float(bad), 0.0,
                                         ok=bad == 0, note=note))

    # -- whole networks -----------------------------------------------------------------

    def _networks(self) -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...], int]] | None:
        """(name, factory of the original in eval mode, input shape, blocks to fuse)."""
        if self.plan.mode == "tiny":
            def toy() -> nn.Module:
                s1 = AWKWARD_SPECS["odd"]
                s2 = InceptionSpec(s1.out_channels, 4, 5, 6, 3, 5, 7, k5=3)
                return nn.Sequential(ReferenceInception(s1), ReferenceInception(s2), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(s2.out_channels, 10)).eval()

            return [("toy: two tiny blocks", toy, (1, 13, 6, 6), 2)]
        try:
            import torchvision  # noqa: F401
        except ImportError:
            return None
        from .cli import build_model

        return [("torchvision googlenet", lambda: build_model("googlenet").eval(), (2, 3, 224, 224), 9),
                ("torchvision inception_v3", lambda: build_model("inception_v3").eval(), (2, 3, 299, 299), 11)]

    def _section_networks(self) -> None:
        from .fused_graph import FusedBranchGraph
        from .swap import swap_inception

        networks = self._networks()
        if networks is None:
            self.skip("networks section", "torchvision is not installed")
            return
        for name, make, shape, expected in networks:
            original = make().to(self.device)
            for prec in self.plan.network_precisions:
                with self.case("networks", name, prec), precision(prec) as dtype, torch.no_grad():
                    self.log(f"networks {name} {prec}")
                    model = copy.deepcopy(original).to(dtype)
                    swapped = swap_inception(copy.deepcopy(model), backend="triton")
                    fused = sum(isinstance(m, (FusedInception, FusedBranchGraph)) for m in swapped.modules())
                    self.checks.append(Check("networks", name, prec, "blocks fused", float(expected - fused), 0.0,
                                             ok=fused == expected, note=f"{fused} of {expected}"))
                    x = torch.randn(shape, device=self.device).to(dtype)
                    want = copy.deepcopy(model).double()(x.double())
                    self.warm(lambda: swapped(x))
                    with poisoned_allocations():
                        got = swapped(x)
                    # fp32: a fixed limit; reduced precision: the eager rule alone (a whole
                    # network in bf16 drifts further than one block's tolerance, eager too).
                    eager = None if prec == "fp32" else model(x)
                    self.compare("networks", name, prec, "logits", got, want, eager,
                                 limit=NETWORK_FP32_TOLERANCE, absolute=prec == "fp32")

    # -- 2**31 offsets --------------------------------------------------------------------

    def _section_offset(self) -> None:
        if not self.plan.offset:
            self.skip("offset section (x and output past 2**31 elements)",
                      "needs ~9 GB of GPU memory: GPU modes only")
            return
        spec, size = OFFSET_SPEC, OFFSET_SIZE
        per_image = size * size * spec.in_channels
        n = OFFSET_ELEMENTS // per_image + 2  # the last image starts past OFFSET_ELEMENTS elements of x
        label = f"n={n} {size}x{size} {spec.in_channels}->{spec.out_channels} channels"
        with self.case("offset", label, "bf16"), precision("bf16") as dtype, torch.no_grad():
            self.log(f"offset {label}: x {n * per_image / 2**31:.3f} x 2**31 elements")
            ref = ReferenceInception(spec).to(self.device, dtype).eval()
            fused = FusedInception.from_module(ref, backend="triton")
            # channels_last from the start: no 4 GB copy.
            x = torch.randn(n, size, size, spec.in_channels, device=self.device, dtype=dtype).permute(0, 3, 1, 2)
            fused(x)
            with poisoned_allocations():
                got = fused(x)
            self.sync()
            nan = int(torch.isnan(got).sum().item())
            self.checks.append(Check("offset", label, "bf16", "NaN anywhere in the output", float(nan), 0.0,
                                     ok=nan == 0, note=f"x {x.numel()} and output {got.numel()} elements"))
            ref64 = copy.deepcopy(ref).double()
            for i in (0, n // 2, n - 1):  # the last image lies wholly past 2**31 in x and in the output
                xi = x[i:i + 1]
                self.compare("offset", label, "bf16", f"image {i}", got[i:i + 1], ref64(xi.double()), ref(xi))
            del x, got
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- launch counts --------------------------------------------------------------------

    def _section_launches(self) -> None:
        from .blocks import fold_conv_bn
        from .fused_graph import FusedBranchGraph
        from .ops.branch_graph import graph_triton_forward_saving, pack_weights
        from .ops.branch_graph_triton import graph_backward_triton, stage_launches
        from .ops.inception import InceptionWeights, preset

        prec = "fp32" if self.plan.mode == "tiny" else "bf16"
        dev = self.device
        name, spec, size = self.plan.googlenet[0]
        with self.case("launches", f"googlenet {name}", prec), precision(prec) as dtype, torch.no_grad():
            ref = ReferenceInception(spec).to(dev, dtype).eval()
            fused = FusedInception.from_module(ref, backend="triton")
            x = torch.randn(2, spec.in_channels, size, size, device=dev, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            eager = copy.deepcopy(ref).to(memory_format=torch.channels_last)
            self.warm(lambda: (fused(x), eager(x)))  # autotune, cuDNN's first-call setup
            with count_launches() as names:
                y = fused(x)
            self._launch_row(f"googlenet {name} forward", names, ["_graph_stage_kernel"] * 2,
                             fused=lambda: fused(x), eager=lambda: eager(x))
            p = preset(spec)
            weights = InceptionWeights(*(t.detach() for t in ref.parameters()))
            b, bias = pack_weights(p.plan, weights.weights, weights.biases, "triton")
            y, inter = graph_triton_forward_saving(x, b, bias, p.flat)
            grad = torch.randn_like(y)
            run = lambda: graph_backward_triton(grad, x, y, inter, weights.weights, [True, True], p.backward_flat)  # noqa: E731
            self.warm(run)
            with count_launches() as names:
                run()
            self._launch_row(f"googlenet {name} backward", names, _backward_launches(p.plan))
        blocks = self._v3_blocks()
        if blocks is None:
            self.skip("v3 launch counts", "torchvision is not installed")
            return
        seen = set()
        for _, label, block, (h, w) in blocks:
            kind = _block_kind(block)
            if kind in seen or kind not in self.plan.v3_launch_types:
                continue
            seen.add(kind)
            with self.case("launches", label, prec), precision(prec) as dtype, torch.no_grad():
                block = copy.deepcopy(block).to(dev, dtype).eval()
                fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton").eval()
                eager = copy.deepcopy(block).to(memory_format=torch.channels_last)
                x = torch.randn(2, fused.spec.in_channels, h, w, device=dev, dtype=dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                fused._packed("triton", None)  # packs and caches the weights: no launches
                self.warm(lambda: (fused(x), eager(x)))
                with count_launches() as names:
                    fused(x)
                # One grouped launch per stage of the plan (a residual block's: the tail's too).
                stages = stage_launches((fused._residual_plan or fused._plan).flat(), fused.spec.in_channels)
                expected = ["_graph_stage_kernel"] * len(stages)
                self._launch_row(f"{label} forward", names, expected, fused=lambda: fused(x),
                                 eager=lambda: eager(x))
                b, bias = fused._packed("triton", None)
                y, inter = graph_triton_forward_saving(x, b, bias, fused._plan.flat())
                weights = [fold_conv_bn(u)[0] for u in fused._units][:fused._op_convs]
                plan = fused._plan.backward_flat()
                grad = torch.randn_like(y)
                self.warm(lambda: graph_backward_triton(grad, x, y, inter, weights, [True, True], plan))
                with count_launches() as names:
                    graph_backward_triton(grad, x, y, inter, weights, [True, True], plan)
                self._launch_row(f"{label} backward", names, _backward_launches(fused._plan))

    def _launch_row(self, case: str, names: list[str], expected: list[str], fused=None, eager=None) -> None:
        row = {"case": case, "triton_launches": len(names), "expected": len(expected), "kernels": names,
               "cuda_kernels_fused": cuda_kernel_count(fused) if fused else None,
               "cuda_kernels_eager": cuda_kernel_count(eager) if eager else None}
        self.launches.append(row)
        ok = names == expected
        self.checks.append(Check("launches", case, "-", "triton launches", float(len(names)), float(len(expected)),
                                 ok=ok, note="" if ok else f"launched {names}, expected {expected}"))

    # -- speed ------------------------------------------------------------------------------

    def _section_speed(self) -> None:
        sp = self.plan.speed
        dev = self.device
        cuda = dev.type == "cuda"
        with precision("bf16" if cuda else "fp32") as dtype, torch.no_grad():
            self.log(f"speed: {dtype} mm peak, {sp.peak_size}^3")
            ceiling = gemm_ceiling(dtype, reps=5 if cuda else 1, device=str(dev), size=sp.peak_size)
        self.speed["peak"] = {"dtype": str(dtype).removeprefix("torch."), "size": sp.peak_size,
                              "mm_tflops": 2 * ceiling["mm"] / 1e3, "conv1x1_tflops": 2 * ceiling["conv1x1"] / 1e3,
                              "datasheet_tflops": device_peak_tflops(dev, torch.bfloat16)}
        peak = self.speed["peak"]["mm_tflops"]
        rows = {}
        for prec in sp.precisions:  # 1. fused against eager channels_last, with autotune time
            for batch in sp.batches:
                for name, spec, size in sp.blocks:
                    what = f"speed {name} n={batch} {prec}"
                    if self.time_allows("block", what, 5.0):
                        with self.timed("block"), self.case("speed", f"{name} n={batch}", prec):
                            rows[(name, batch, prec)] = self._time_block(name, spec, size, batch, prec, peak)
        self._time_networks(compile_=False)
        if sp.compile:  # 2. torch.compile, the slowest peer to set up, for as many as time allows
            for (name, batch, prec), row in rows.items():
                spec, size = next((s, z) for n_, s, z in sp.blocks if n_ == name)
                if self.time_allows("compile", f"speed {name} n={batch} {prec}: torch.compile", 40.0):
                    with self.timed("compile"), self.case("speed", f"{name} n={batch} compile", prec, counts=False):
                        self._time_compile(row, spec, size, batch, prec)
            self._time_networks(compile_=True)
        else:
            self.skip("torch.compile peers", f"not in {self.plan.mode} mode")

    def _block_modules(self, spec: InceptionSpec, size: int, batch: int, dtype):
        ref = ReferenceInception(spec).to(self.device, dtype).eval().to(memory_format=torch.channels_last)
        fused = FusedInception.from_module(copy.deepcopy(ref), backend="triton")
        x = torch.randn(batch, spec.in_channels, size, size, device=self.device, dtype=dtype)
        return ref, fused, x.contiguous(memory_format=torch.channels_last)

    def _time_block(self, name: str, spec: InceptionSpec, size: int, batch: int, prec: str, peak: float) -> dict:
        from .ops.triton_gemm import TUNED

        self.log(f"speed {name} n={batch} {prec}")
        with precision(prec) as dtype, torch.no_grad():
            ref, fused, x = self._block_modules(spec, size, batch, dtype)
            # Autotune time: the first call with this problem's tuned configs forgotten (its
            # kernels may already be compiled by the correctness sections).
            tuned = dict(TUNED)
            TUNED.clear()
            self.sync()
            t = time.perf_counter()
            fused(x)
            self.sync()
            tune_s = time.perf_counter() - t
            TUNED.update(tuned)
            seconds = time_alternating({"fused": lambda: fused(x), "eager_channels_last": lambda: ref(x)},
                                       reps=self.plan.speed.reps, device=self.device)
            graph_ms = ({"fused": cuda_graph_ms(lambda: fused(x)), "eager_channels_last": cuda_graph_ms(lambda: ref(x))}
                        if self.device.type == "cuda" else {})
        case = CaseResult(block=name, batch=batch, dtype=prec, backend="triton",
                          macs=spec.macs(size, size, batch).total, ms={k: v * 1e3 for k, v in seconds.items()})
        row = {"block": name, "batch": batch, "precision": prec, "ms": case.ms, "macs": case.macs,
               "tflops": case.fused_tflops, "pct_of_mm_peak": 100 * case.fused_tflops / peak,
               "speedup": {"eager_channels_last": case.speedup("eager_channels_last")}, "tune_s": tune_s,
               "cuda_graph_ms": graph_ms}
        self.speed["blocks"].append(row)
        return row

    def _time_compile(self, row: dict, spec: InceptionSpec, size: int, batch: int, prec: str) -> None:
        self.log(f"speed {row['block']} n={batch} {prec}: torch.compile")
        torch._dynamo.reset()  # a fresh cache: no recompile limit reached, no stale guards
        with precision(prec) as dtype, torch.no_grad():
            ref, fused, x = self._block_modules(spec, size, batch, dtype)
            t = time.perf_counter()
            compiled = _compiled(ref, x)
            row["compile_s"] = time.perf_counter() - t
            seconds = time_alternating({"fused": lambda: fused(x), "compile_freezing": lambda: compiled(x)},
                                       reps=self.plan.speed.reps, device=self.device)
        # The ratio within this alternation; "fused ms" stays the eager alternation's.
        row["ms"]["compile_freezing"] = seconds["compile_freezing"] * 1e3
        row["speedup"]["compile_freezing"] = seconds["compile_freezing"] / seconds["fused"]

    def _time_networks(self, compile_: bool) -> None:
        if not self.plan.speed.networks and not compile_:
            self.skip("network timing", f"not in {self.plan.mode} mode")
        for model, batch in self.plan.speed.networks:
            what = f"speed {model} n={batch} bf16{' with torch.compile' if compile_ else ''}"
            kind = "network compile" if compile_ else "network"
            if not self.time_allows(kind, what, 120.0 if compile_ else 30.0):
                continue
            self.log(what)
            with self.timed(kind), self.case("speed", f"{model} n={batch}{' compile' if compile_ else ''}", "bf16",
                                             counts=not compile_):
                if compile_:
                    torch._dynamo.reset()
                row = bench_networks([batch], with_compile=compile_, reps=self.plan.speed.reps, model=model,
                                     device=str(self.device), dtype=torch.bfloat16)[0]
                self.speed["networks"] = [r for r in self.speed["networks"]
                                          if (r["model"], r["batch"]) != (model, batch)] + [row]

    # -- output -----------------------------------------------------------------------------

    def to_json_dict(self) -> dict:
        failed = [asdict(c) for c in self.checks if not c.ok]
        return {"mode": self.plan.mode, "ok": self.ok, "elapsed_s": round(self.elapsed(), 1), "versions": self.info,
                "sections": self.sections, "section_s": self.section_s, "time_limit_s": self.plan.time_limit_s,
                "tolerance": TOLERANCE, "eager_factor": EAGER_FACTOR, "eager_floor": EAGER_FLOOR,
                "network_fp32_tolerance": NETWORK_FP32_TOLERANCE, "correctness_tuning_ms": CORRECTNESS_TUNING_MS,
                "summary": {"checks": len(self.checks), "failed": len(failed)}, "failures": failed,
                "skipped": self.skipped, "launches": self.launches, "speed": self.speed, "errors": self.errors,
                "checks": [asdict(c) for c in self.checks]}

    def write(self) -> None:
        self._written = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(_finite(self.to_json_dict()), indent=1) + "\n")
        (self.out / "gpu_check.md").write_text(self.to_markdown() + "\n")

    def to_markdown(self) -> str:
        i = self.info
        where = (f"{i['gpu']} (sm_{i['capability'].replace('.', '')}, {i['sms']} SMs, {i['gpu_memory_gib']} GiB), "
                 f"CUDA {i['cuda']}, cuDNN {i['cudnn']}" if "gpu" in i else f"CPU {i.get('cpu')} (Triton interpreter)")
        failed = sum(not c.ok for c in self.checks)
        lines = [f"# inception_fast gpu-check ({self.plan.mode}): {'PASS' if self.ok else 'FAIL'}", "",
                 f"{where}; torch {i['torch']}, triton {i['triton']}, torchvision {i['torchvision']}, "
                 f"Python {i['python']}; {i['date']}; {self.elapsed():.0f} s "
                 f"({', '.join(f'{k} {v:.0f} s' for k, v in self.section_s.items())}).", "",
                 f"## Correctness: {len(self.checks) - failed} of {len(self.checks)} checks passed", "",
                 "Relative L2 error against fp64; limits fp32 1e-5, tf32/fp16 5e-3, bf16 2e-2, and in reduced "
                 f"precision at most {EAGER_FACTOR:g}x eager's own error. One row per case: its worst quantity "
                 "(by error / limit). All quantities in gpu_check.json.", "",
                 "| section | case | precision | checks | worst | error | limit | eager error | ok |",
                 "|---|---|---|---:|---|---:|---:|---:|:-:|"]
        groups: dict[tuple, list[Check]] = {}
        for c in self.checks:
            groups.setdefault((c.section, c.case, c.precision), []).append(c)
        for (section, case, prec), checks in groups.items():
            worst = max(checks, key=_badness)
            lines.append(f"| {section} | {case} | {prec} | {len(checks)} | {worst.quantity} | {_num(worst.error)} | "
                         f"{_num(worst.limit)} | {_num(worst.eager_error)} | "
                         f"{'yes' if all(c.ok for c in checks) else '**NO**'} |")
        bad = [c for c in self.checks if not c.ok]
        if bad:
            lines += ["", "### Failures", "",
                      "| section | case | precision | quantity | error | limit | eager | note |",
                      "|---|---|---|---|---:|---:|---:|---|"]
            lines += [f"| {c.section} | {c.case} | {c.precision} | {c.quantity} | {_num(c.error)} | {_num(c.limit)} | "
                      f"{_num(c.eager_error)} | {c.note} |" for c in bad[:200]]
        if self.launches:
            lines += ["", "## Kernel launches per call", "",
                      "| case | Triton launches | expected | CUDA kernels fused | CUDA kernels eager |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['case']} | {r['triton_launches']} | {r['expected']} | {_num(r['cuda_kernels_fused'])} | "
                      f"{_num(r['cuda_kernels_eager'])} |" for r in self.launches]
        lines += self._speed_markdown()
        if self.skipped:
            lines += ["", "## Not run", ""] + [f"- {s['what']}: {s['why']}" for s in self.skipped]
        return "\n".join(lines)

    def _speed_markdown(self) -> list[str]:
        peak = self.speed.get("peak")
        if not peak:
            return []
        sheet = peak["datasheet_tflops"]
        lines = ["", "## Speed", "",
                 f"Medians of triton.testing.do_bench (CUDA events) on GPUs, alternating providers in one process. "
                 f"Peak: torch.mm {peak['dtype']} {peak['size']}³ measured at {peak['mm_tflops']:.3g} TFLOP/s in this "
                 f"run{f' (datasheet {sheet:g})' if sheet else ''}. \"vs compile\" is from its own alternation with "
                 "the fused module. \"tune s\": the first call with the problem's autotune result forgotten. "
                 "\"graph\": the same calls captured as CUDA graphs and replayed, device time without the host's "
                 "launch overhead."]
        for prec in dict.fromkeys(r["precision"] for r in self.speed["blocks"]):
            title = f"{prec}{' (tf32 in cuBLAS, cuDNN and Triton)' if prec == 'tf32' else ''}"
            lines += ["", f"### GoogLeNet blocks, {title}", "",
                      "| block | batch | fused ms | TFLOP/s | % of mm peak | eager CL ms | vs eager CL | graph: fused ms | "
                      "graph: eager CL ms | graph: vs eager CL | compile ms | vs compile | tune s |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in (r for r in self.speed["blocks"] if r["precision"] == prec):
                ms, sp, g = r["ms"], r["speedup"], r.get("cuda_graph_ms") or {}
                graph_ratio = (f"{g['eager_channels_last'] / g['fused']:.2f}×" if g.get("fused") else "–")
                lines.append(f"| {r['block']} | {r['batch']} | {ms['fused']:.3f} | {r['tflops']:.1f} | "
                             f"{r['pct_of_mm_peak']:.0f}% | {ms['eager_channels_last']:.3f} | "
                             f"{sp['eager_channels_last']:.2f}× | {_num(g.get('fused'), '.3f')} | "
                             f"{_num(g.get('eager_channels_last'), '.3f')} | {graph_ratio} | "
                             f"{_num(ms.get('compile_freezing'), '.3f')} | "
                             f"{_num(sp.get('compile_freezing'), '.2f')}{'×' if 'compile_freezing' in sp else ''} | "
                             f"{r['tune_s']:.2f} |")
        if self.speed["networks"]:
            lines += ["", "### Whole networks", "", "| model | dtype | batch | fused ms | eager CL ms | compile ms | "
                      "vs eager CL | vs compile |", "|---|---|---:|---:|---:|---:|---:|---:|"]
            for r in self.speed["networks"]:
                ms, sp = r["ms"], r["speedup"]
                lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {ms['fused']:.2f} | "
                             f"{ms['eager_channels_last']:.2f} | "
                             f"{_num(ms.get('compile_freezing'), '.2f')} | {sp['eager_channels_last']:.2f}× | "
                             f"{_num(sp.get('compile_freezing'), '.2f')}{'×' if 'compile_freezing' in sp else ''} |")
        return lines


def _badness(c: Check) -> float:
    if not c.ok:
        return math.inf
    if c.error is None or not c.limit:
        return 0.0
    return c.error / c.limit


def _num(v, fmt: str = ".2e") -> str:
    if v is None:
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))  # counts, and exact results
    return format(v, fmt) if math.isfinite(v) else str(v)


def _finite(obj):
    """JSON has no NaN or inf: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def check_device(mode: str) -> torch.device:
    """The device a mode runs on: the current CUDA GPU, or in tiny mode under
    TRITON_INTERPRET=1 the CPU. Raises RuntimeError, saying why, where the check cannot run:
    no triton, no GPU outside tiny mode, tiny mode on a CPU without TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise RuntimeError("gpu-check needs the triton package, which is not installed") from None
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available() and not interpreting:
        return torch.device("cuda", torch.cuda.current_device())
    if mode != "tiny":
        raise RuntimeError(f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
                           "run it on a GPU machine, or --tiny under TRITON_INTERPRET=1 for the CPU self-test")
    if not interpreting:
        raise RuntimeError("--tiny on a CPU runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1 "
                           "before Python starts")
    return torch.device("cpu")
