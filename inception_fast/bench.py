"""Microbenchmarks: the fused module against its peers, as ratios measured in one process.

Method: every provider of a case runs in the
same process, in alternating order, and each reports the median of its timed
runs after warm-up. Only ratios within one run are compared. GMAC/s use the
spec's analytic MAC count, which the profiler checks against FlopCounterMode.
On CUDA tensors the same code times with CUDA events via triton.testing.do_bench.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ._extension import cpu_extension
from .fused import FusedInception
from .reference import ReferenceInception
from .spec import GOOGLENET_INCEPTION

__all__ = ["CaseResult", "BenchReport", "time_alternating", "do_bench_median", "gemm_ceiling", "bench_blocks",
           "bench_v3_blocks", "bench_networks", "machine_info", "device_peak_tflops"]

PEERS = ("eager_nchw", "eager_channels_last", "compile_freezing", "compile")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def do_bench_median(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn by triton.testing.do_bench (CUDA events, L2 flushed between
    runs), whatever the installed triton's signature: `return_mode` came after `quantiles`,
    and a triton that has neither returns its only statistic."""
    from triton.testing import do_bench

    params = inspect.signature(do_bench).parameters
    if "return_mode" in params:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    if "quantiles" in params:
        return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5]))
    return float(do_bench(fn, warmup=warmup, rep=rep))


def minor_page_faults() -> int | None:
    """This process's minor page faults so far (getrusage), or None where the platform has
    no `resource` module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_alternating(
    providers: dict[str, Callable[[], object]], reps: int = 10, warmup: int = 2, device: torch.device | str = "cpu",
    faults: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each provider, the providers interleaved in rotating order.

    With `faults` (a dict, CPU only), also the median minor page faults per timed call of
    each provider, written into it. On the CPU a call that gets fresh pages from the kernel
    pays for faulting them in, and whether glibc hands a large allocation back to the kernel
    between calls depends on its heap's state, so the same code can time 20-30% apart in
    two runs (GoogLeNet 4a's train step: 0 or ~35 MB faulted a call). The counts say which
    contender paid for that in a given run."""
    device = torch.device(device)
    if device.type == "cuda":
        # do_bench flushes L2 and times with CUDA events; interleave by alternating calls.
        samples = {name: [] for name in providers}
        for _ in range(max(1, reps // 5)):
            for name, fn in providers.items():
                samples[name].append(do_bench_median(fn) / 1e3)
        return {name: statistics.median(s) for name, s in samples.items()}
    names = list(providers)
    for _ in range(warmup):
        for name in names:
            providers[name]()
    samples = {name: [] for name in names}
    faulted = {name: [] for name in names}
    counting = faults is not None and minor_page_faults() is not None
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            _sync(device)
            before = minor_page_faults() if counting else 0
            start = time.perf_counter()
            providers[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
            if counting:
                faulted[name].append(minor_page_faults() - before)
    if counting:
        faults.update({name: statistics.median(f) for name, f in faulted.items()})
    return {name: statistics.median(s) for name, s in samples.items()}


def _better_ceiling(first: dict[str, float], dtype: torch.dtype, device: str) -> dict[str, float]:
    """The GEMM ceiling measured again after the cases, keeping the better of the two per
    GEMM: one measurement taken while the shared machine is busy reads low (90 against 120)."""
    again = gemm_ceiling(dtype, device=device)
    return {k: max(first[k], again[k]) for k in first}


def gemm_ceiling(dtype: torch.dtype = torch.float32, reps: int = 10, device: str = "cpu",
                 size: int = 2048) -> dict[str, float]:
    """GMAC/s of torch.mm (MKL/cuBLAS) and of a large channels_last 1x1 conv (oneDNN/cuDNN), same
    shape: size^3 multiply-adds (size a multiple of 64; 2048 on CPUs, larger to fill a GPU)."""
    n = size
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    # The same GEMM as a 1x1 convolution: n pixels (a 64-wide grid), n -> n channels.
    x = torch.randn(1, n, n // 64, 64, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t = time_alternating(
            {"mm": lambda: torch.mm(a, b), "conv1x1": lambda: torch.nn.functional.conv2d(x, w)},
            reps=reps, device=device,
        )
    return {name: n**3 / seconds / 1e9 for name, seconds in t.items()}


# Dense peak TFLOP/s from the vendors' datasheets: (fp16/bf16 tensor core, tf32 tensor
# core, fp32 FMA). Keyed by compute capability; PCIe boards of a generation run lower clocks.
_PEAK_TFLOPS = {
    ((9, 0), "pcie"): (756.0, 378.0, 51.2),  # H100 PCIe
    ((9, 0), ""): (989.4, 494.7, 66.9),      # H100 SXM, H200
    ((8, 0), ""): (312.0, 156.0, 19.5),      # A100
}


def device_peak_tflops(device: str | torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet peak of a CUDA device for dtype's math, or None where not tabled (or CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device).lower()
    row = _PEAK_TFLOPS.get((capability, "pcie" if "pcie" in name else "")) or _PEAK_TFLOPS.get((capability, ""))
    if row is None:
        return None
    if dtype in (torch.float16, torch.bfloat16):
        return row[0]
    if dtype == torch.float32:
        return row[1] if torch.backends.cuda.matmul.allow_tf32 else row[2]
    return None


def machine_info(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    if torch.device(device).type == "cuda":
        peak = device_peak_tflops(device, dtype)
        return {"cpu": torch.cuda.get_device_name(device), "threads": "GPU", "torch": torch.__version__,
                "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                "peak_tflops": "" if peak is None else f"{peak:g}"}
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith("flags"))
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name", cpu)
        # "AMD EPYC" alone names two CPUs here that differ 2x in fp32 FMA throughput (Zen 4
        # runs a 512-bit FMA as two halves, Zen 5 has two full 512-bit FMA pipes).
        if "cpu family" in fields:
            zen = {"25": "Zen 3/4", "26": "Zen 5"}.get(fields["cpu family"], "") if "AMD" in cpu else ""
            cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')}{', ' + zen if zen else ''})"
    ext = cpu_extension()
    busy = other_processes_busy()
    return {
        "cpu": cpu,
        "threads": str(torch.get_num_threads()),
        # Cores other processes kept busy just before timing: "" where /proc is missing.
        "busy_cores": "" if busy is None else f"{busy:.2f}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        # How the C++ kernel multiplies bf16 on this build: AVX512-BF16 or widened fp32.
        "bf16_kernel": ext.bf16_path() if ext is not None else "none (extension not built)",
        "allocator": allocator(),
    }


def allocator() -> str:
    """The process's memory allocator: "tcmalloc", "jemalloc" or "mimalloc" where one is
    mapped into the process (/proc/self/maps; "(LD_PRELOAD)" where that variable names it),
    else "glibc" with any MALLOC_* tuning and THP_MEM_ALLOC_ENABLE. An LD_PRELOAD whose
    library did not load (the loader prints one line and goes on) is named as such, not
    taken for the allocator. Without /proc (not Linux) the environment alone decides.
    Whether a call's large buffers come back mapped or get faulted in anew moves every CPU
    timing: Inception-v3's inference at batch 32 ran 1.13-1.16x faster swapped, 1.2-1.3x
    eager, under tcmalloc than under glibc's defaults (README, "The allocator";
    benchmarks/allocators.py)."""
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        with open("/proc/self/maps") as f:
            mapped = f.read()
    except OSError:
        mapped = None
    names = ("tcmalloc", "jemalloc", "mimalloc")
    for name in names:
        if name in (preload if mapped is None else mapped):
            return name + (" (LD_PRELOAD)" if name in preload else "")
    tuning = [f"{k}={v}" for k, v in sorted(os.environ.items())
              if k.startswith("MALLOC_") or k == "THP_MEM_ALLOC_ENABLE"]
    missing = [name for name in names if name in preload]
    return ("glibc" + (", " + " ".join(tuning) if tuning else " (default)")
            + (f"; LD_PRELOAD names {missing[0]}, which did not load" if missing else ""))


def other_processes_busy(seconds: float = 0.5) -> float | None:
    """Cores' worth of CPU time that other processes used over `seconds` of this process
    sleeping (Linux /proc/stat minus /proc/self/stat), or None without /proc. Timings taken
    while it is well above 0 compare contenders under load: a fresh-clone `make demo` next
    to another job once timed every block at batch 1 30x slower than on a quiet machine."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])  # utime, stime

    try:
        hz = os.sysconf("SC_CLK_TCK")
        (all0, own0), t0 = ticks(), time.perf_counter()
        time.sleep(seconds)
        (all1, own1), t1 = ticks(), time.perf_counter()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, ((all1 - all0) - (own1 - own0)) / hz / (t1 - t0))


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto writes "profiler_start/stop" and, on machines without a GPU, a CUDA device
    count error straight to file descriptor 2 at every profiler session: noise, not news."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_forward_bytes(fn: Callable[[], object]) -> int | None:
    """Peak bytes allocated while fn() runs (CPU), replayed from torch.profiler's memory
    timeline; the kernels' own scratch (t3, t5) counts, as it goes through torch's
    allocator. None where this torch has no memory timeline (a private API)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action
    except ImportError:
        return None
    with torch.no_grad():
        fn()  # warm caches outside the measurement
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                                record_shapes=True, with_stack=True) as prof:
            fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def saved_tensor_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes that autograd keeps for the backward of module(x) (x requiring grad)."""
    saved: dict[int, int] = {}  # by storage, so that views of one tensor count once

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in params and ptr != x.untyped_storage().data_ptr())


@dataclass
class CaseResult:
    block: str
    batch: int
    dtype: str
    backend: str
    macs: int  # of the timed work: 3x the forward's with a backward
    ms: dict[str, float]  # provider -> median milliseconds
    # fused and eager channels_last: peak forward bytes, bytes saved for backward
    memory: dict[str, int | None] = field(default_factory=dict)
    # provider -> median minor page faults per timed call (time_alternating's `faults`)
    faults: dict[str, float] = field(default_factory=dict)

    @property
    def fused_gmacs(self) -> float:
        return self.macs / (self.ms["fused"] / 1e3) / 1e9

    @property
    def fused_tflops(self) -> float:
        return 2 * self.fused_gmacs / 1e3  # two FLOPs per multiply-add

    def speedup(self, peer: str) -> float | None:
        return self.ms[peer] / self.ms["fused"] if peer in self.ms else None


@dataclass
class BenchReport:
    machine: dict[str, str]
    ceiling_gmacs: dict[str, float]
    cases: list[CaseResult]

    @property
    def ceiling(self) -> float:
        return max(self.ceiling_gmacs.values())

    @property
    def peak_tflops(self) -> float | None:
        """The device's datasheet peak (CUDA only): adds TFLOP/s and % of peak columns."""
        peak = self.machine.get("peak_tflops")
        return float(peak) if peak else None

    def geomean_speedup(self, peer: str) -> float | None:
        values = [s for c in self.cases if (s := c.speedup(peer)) is not None]
        return math.exp(sum(map(math.log, values)) / len(values)) if values else None

    def to_markdown(self) -> str:
        peers = [p for p in PEERS if any(p in c.ms for c in self.cases)]
        with_memory = any(c.memory for c in self.cases)
        head = ["block", "batch", "fused ms", "GMAC/s", "% of ceiling"]
        if self.peak_tflops:
            head += ["TFLOP/s", "% of device peak"]
        head += [f"vs {p}" for p in peers]
        if with_memory:
            head += ["peak MB fused / eager CL", "saved MB fused / eager CL"]
        with_faults = any("fused" in c.faults and "eager_channels_last" in c.faults for c in self.cases)
        if with_faults:
            head += ["page faults/call fused / eager CL"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def mb(a: int | None, b: int | None) -> str:
            return "–" if a is None or b is None else f"{a / 1e6:.1f} / {b / 1e6:.1f}"

        for c in self.cases:
            cells = [c.block, str(c.batch), f"{c.ms['fused']:.2f}", f"{c.fused_gmacs:.1f}",
                     f"{c.fused_gmacs / self.ceiling:.0%}"]
            if self.peak_tflops:
                cells += [f"{c.fused_tflops:.1f}", f"{c.fused_tflops / self.peak_tflops:.0%}"]
            cells += [f"{s:.2f}×" if (s := c.speedup(p)) is not None else "–" for p in peers]
            if with_memory:
                m = c.memory
                cells += [mb(m.get("fused_peak"), m.get("eager_peak")), mb(m.get("fused_saved"), m.get("eager_saved"))]
            if with_faults:
                f = c.faults
                cells += [f"{f['fused']:.0f} / {f['eager_channels_last']:.0f}"
                          if "fused" in f and "eager_channels_last" in f else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        geo = [f"{g:.2f}×" if (g := self.geomean_speedup(p)) is not None else "–" for p in peers]
        lines.append("| **geomean** | | | | | " + ("| | " if self.peak_tflops else "") + " | ".join(f"**{g}**" for g in geo) + " |"
                     + (" | |" if with_memory else "") + (" |" if with_faults else ""))
        ceil = ", ".join(f"{k} {v:.1f}" for k, v in self.ceiling_gmacs.items())
        lines.append(f"\nGEMM ceiling (GMAC/s, same run, 2048³, the better of before and after the cases): {ceil}. "
                     f"Machine: {self.machine['cpu']}, {self.machine['threads']} threads, "
                     f"torch {self.machine['torch']}, {self.machine['date']}."
                     + (f" Allocator: {self.machine['allocator']}." if self.machine.get("allocator") else "")
                     + (" Page faults: minor faults per timed call, median (getrusage); a call that faults "
                        "its buffers in anew pays for it in time." if with_faults else "")
                     + (f" **Other processes kept {busy} cores busy when this run began: these timings compare "
                        "contenders under load and are not reliable.**"
                        if (busy := self.machine.get("busy_cores")) and float(busy) >= 0.25 else "")
                     + (f" bf16 kernel: {self.machine['bf16_kernel']}." if any(c.dtype == "bfloat16" for c in self.cases)
                        and "bf16_kernel" in self.machine else "")
                     + (" GMAC/s count the convolutions' multiply-adds as eager does; the fp32 CPU kernel runs 3×3 "
                        "stride-1 stages as Winograd F(4×4, 3×3) (4× fewer multiplies; grids of 32+ well-fitting 4×4 tiles) "
                        "or F(2×2, 3×3) (2.25×), 5×5 as F(2×2, 5×5) (2.78×) where cin·cout/(cin + cout) ≥ 20, "
                        "1×7/7×1 as F(2, 7) "
                        "(1.75×) and 1×3/3×1 as F(2, 3) (1.5×), so a block may pass 100% of the GEMM ceiling." if not self.peak_tflops and any(c.dtype == "float32" for c in self.cases)
                        else ""))
        return "\n".join(lines)

    def to_csv(self) -> str:
        """One row per (case, provider): ms, GMAC/s and the fused module's speedup over it."""
        rows = ["block,batch,dtype,backend,provider,ms,gmacs,fused_speedup"]
        for c in self.cases:
            for provider, ms in c.ms.items():
                gmacs = c.macs / (ms / 1e3) / 1e9
                rows.append(f"{c.block},{c.batch},{c.dtype},{c.backend},{provider},{ms:.4f},{gmacs:.2f},"
                            f"{ms / c.ms['fused']:.4f}")
        return "\n".join(rows) + "\n"

    def to_json_dict(self) -> dict:
        return {"machine": self.machine, "ceiling_gmacs": self.ceiling_gmacs,
                "cases": [asdict(c) | {"fused_gmacs": c.fused_gmacs} for c in self.cases]}


def _compiled(module: torch.nn.Module, example: torch.Tensor, freezing: bool = True) -> Callable:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freezing  # inference: constant-fold and prepack the weights
    compiled = torch.compile(module)
    with torch.set_grad_enabled(not freezing):
        compiled(example)  # compile outside the timed region
    return compiled


def _step(module: Callable, x: torch.Tensor, grad: torch.Tensor | None) -> Callable[[], object]:
    """A forward, or with `grad` a forward and a backward from x (which then requires grad)."""
    if grad is None:
        return lambda: module(x)
    x = x.detach().requires_grad_()
    return lambda: module(x).backward(grad)


def each_case(names: list[str], batches: list[int], progress: Callable[[str], None] | None, what: str):
    """Every (name, batch) in order, each announced through `progress` as
    "[k/total] what name, batch b"."""
    total = len(names) * len(batches)
    for k, (name, batch) in enumerate(itertools.product(names, batches)):
        if progress:
            progress(f"[{k + 1}/{total}] {what} {name}, batch {batch}")
        yield name, batch


def bench_blocks(
    blocks: list[str],
    batches: list[int],
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    with_compile: bool = True,
    reps: int = 10,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    backward: bool = False,
) -> BenchReport:
    """Time each GoogLeNet block against each peer, in one process.

    With `backward`, each provider runs forward and backward (train mode, the same
    grad_output for all) and torch.compile runs without freezing.
    """
    ceiling = gemm_ceiling(dtype, device=device)
    cases = []
    for name, batch in each_case(blocks, batches, progress, "block"):
        block = GOOGLENET_INCEPTION[name]
        ref = ReferenceInception(block.spec).to(device=device, dtype=dtype).train(backward)
        ref_cl = ReferenceInception(block.spec).to(device=device, dtype=dtype).train(backward)
        ref_cl.load_state_dict(ref.state_dict())
        ref_cl = ref_cl.to(memory_format=torch.channels_last)
        fused = FusedInception.from_module(copy.deepcopy(ref), backend=backend)
        x = torch.randn(batch, block.spec.in_channels, block.size, block.size, device=device, dtype=dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        modules = {"fused": (fused, x_cl), "eager_nchw": (ref, x), "eager_channels_last": (ref_cl, x_cl)}
        if with_compile:
            # Freezing is for inference only: training compiles without it.
            modules["compile" if backward else "compile_freezing"] = (
                _compiled(ref_cl, x_cl, freezing=not backward), x_cl)
        grad = torch.randn(batch, block.spec.out_channels, block.size, block.size, device=device, dtype=dtype)
        # Each provider gets grad_output in its own output's layout, as the layer above
        # it in a network of that layout would hand it over.
        grad_cl = grad.contiguous(memory_format=torch.channels_last)
        providers = {name: _step(m, inp, (grad if inp is x else grad_cl) if backward else None)
                     for name, (m, inp) in modules.items()}
        with torch.set_grad_enabled(backward):
            seconds = time_alternating(providers, reps=reps, device=device)
        memory = {}
        if torch.device(device).type == "cpu":  # CUDA would read torch.cuda.max_memory_allocated
            memory = {
                "fused_peak": peak_forward_bytes(lambda: fused(x_cl)),
                "eager_peak": peak_forward_bytes(lambda: ref_cl(x_cl)),
                "fused_saved": saved_tensor_bytes(fused.train(), x_cl),
                "eager_saved": saved_tensor_bytes(ref_cl.train(), x_cl),
            }
            fused.train(backward), ref_cl.train(backward)
        cases.append(CaseResult(
            block=name, batch=batch, dtype=str(dtype).removeprefix("torch."), backend=backend,
            # A backward costs two forwards (data and weight gradients): 3x in all.
            macs=(3 if backward else 1) * block.spec.macs(block.size, block.size, batch).total,
            ms={k: v * 1e3 for k, v in seconds.items()}, memory=memory,
        ))
    return BenchReport(machine=machine_info(device, dtype), ceiling_gmacs=_better_ceiling(ceiling, dtype, device),
                       cases=cases)


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Inception-v3's blocks with distinct shapes (6c and 6d are alike), and their input grids.
V3_BLOCKS = {"Mixed_5b": 35, "Mixed_5c": 35, "Mixed_5d": 35, "Mixed_6a": 35, "Mixed_6b": 17, "Mixed_6c": 17,
             "Mixed_6e": 17, "Mixed_7a": 17, "Mixed_7b": 8, "Mixed_7c": 8}


def _inception_v3() -> torch.nn.Module:
    import torchvision

    return torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True).eval()


def bench_v3_blocks(
    batches: list[int], with_compile: bool = True, reps: int = 10, progress: Callable[[str], None] | None = None,
    backward: bool = False,
) -> BenchReport:
    """Each Inception-v3 block (torchvision InceptionA to E, eval, BN folded by the fused
    module) against eager channels_last and torch.compile (with freezing), on CPU.

    With `backward`, every provider runs forward and backward in eval mode (frozen BN, as
    when fine-tuning with frozen statistics or taking input gradients): the fused module
    on its fused backward, against eager autograd and torch.compile without freezing,
    each given grad_output in its own output's layout.
    """
    from .fused_graph import FusedBranchGraph

    model = _inception_v3()
    ceiling = gemm_ceiling()
    cases = []
    for name, batch in each_case(list(V3_BLOCKS), batches, progress, "inception_v3"):
        size = V3_BLOCKS[name]
        block = copy.deepcopy(getattr(model, name)).to(memory_format=torch.channels_last)
        fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
        x = torch.randn(batch, fused.spec.in_channels, size, size).contiguous(memory_format=torch.channels_last)
        grad = None
        if backward:
            with torch.no_grad():
                grad = torch.randn_like(block(x))  # channels_last, as both outputs are
        modules = {"fused": fused, "eager_channels_last": block}
        if with_compile:
            peer = "compile" if backward else "compile_freezing"
            modules[peer] = _compiled(copy.deepcopy(block), x, freezing=not backward)
        providers = {k: _step(m, x, grad) for k, m in modules.items()}
        with torch.set_grad_enabled(backward):
            seconds = time_alternating(providers, reps=reps)
        cases.append(CaseResult(block=f"{name} ({fused.source[-1]})", batch=batch, dtype="float32", backend="cpu",
                                macs=(3 if backward else 1) * fused.spec.macs(size, size, batch),
                                ms={k: v * 1e3 for k, v in seconds.items()}))
    return BenchReport(machine=machine_info("cpu"), ceiling_gmacs=_better_ceiling(ceiling, torch.float32, "cpu"),
                       cases=cases)


_NETWORKS = {  # name -> (constructor, input size)
    "torchvision googlenet": (lambda: __import__("torchvision").models.googlenet(
        weights=None, aux_logits=False, init_weights=True).eval(), 224),
    "torchvision inception_v3": (_inception_v3, 299),
}


def bench_networks(
    batches: list[int], with_compile: bool = True, reps: int = 5, progress: Callable[[str], None] | None = None,
    model: str = "torchvision googlenet", device: str = "cpu", dtype: torch.dtype = torch.float32,
    convs: bool = False,
) -> list[dict]:
    """A whole torchvision network (random weights, eval): swapped against eager and compile.
    convs: swap with swap_inception(model, convs=True), the stem's conv units fused too."""
    from .swap import swap_inception

    make, size = _NETWORKS[model]
    rows = []
    for batch in batches:
        if progress:
            progress(f"{model}, batch {batch}")
        original = make().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        swapped = swap_inception(copy.deepcopy(original), convs=convs)
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        providers = {"fused": lambda: swapped(x), "eager_channels_last": lambda: original(x)}
        compile_s = {}
        if with_compile:
            # The user who swaps and then compiles: the fused ops sit in inductor's graph.
            for name, module in (("compile_freezing", original), ("compile_swapped", swapped)):
                start = time.perf_counter()
                compiled = _compiled(module, x)
                compile_s[name] = time.perf_counter() - start
                providers[name] = lambda compiled=compiled: compiled(x)
        with torch.no_grad():
            seconds = time_alternating(providers, reps=reps, device=device)
        rows.append({"model": model + (", convs=True" if convs else ""), "batch": batch,
                     "dtype": str(dtype).removeprefix("torch."),
                     "ms": {k: v * 1e3 for k, v in seconds.items()}, "compile_s": compile_s,
                     "speedup": {k: v / seconds["fused"] for k, v in seconds.items() if k != "fused"}})
    return rows


def networks_markdown(rows: list[dict]) -> str:
    """The whole-network table: fused eager and compile(swap(model)) against eager and
    compile(model) (ratios: the other's time over this one's), with compile times."""
    nan = float("nan")
    lines = ["| model | batch | eager CL ms | fused eager ms | compile(model) ms | compile(swap(model)) ms | "
             "fused vs eager CL | fused vs compile | compile(swap) vs compile | compile s: model / swapped |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms, cs = r["ms"], r.get("compile_s", {})
        compile_ms, swapped_ms = ms.get("compile_freezing", nan), ms.get("compile_swapped", nan)
        model = r["model"] + ("" if r.get("dtype", "float32") == "float32" else f" ({r['dtype']})")
        lines.append(f"| {model} | {r['batch']} | {ms['eager_channels_last']:.1f} | {ms['fused']:.1f} | "
                     f"{compile_ms:.1f} | {swapped_ms:.1f} | {ms['eager_channels_last'] / ms['fused']:.2f}× | "
                     f"{compile_ms / ms['fused']:.2f}× | {compile_ms / swapped_ms:.2f}× | "
                     f"{cs.get('compile_freezing', nan):.0f} / {cs.get('compile_swapped', nan):.0f} |")
    return "\n".join(lines)
