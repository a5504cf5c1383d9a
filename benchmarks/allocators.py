"""The process's memory allocator against eager and swapped CPU runs: glibc's malloc as it
comes, the same without the kernels' huge-page advice (INCEPTION_FAST_HUGE_PAGES=0,
csrc/huge_pages.h), glibc tuned (MALLOC_* variables), PyTorch's transparent huge pages
for every tensor (THP_MEM_ALLOC_ENABLE=1), tcmalloc and jemalloc (LD_PRELOAD).

    PYTHONPATH=. python benchmarks/allocators.py [--rounds 2] [--reps 5] [--out benchmarks/results/allocators.md]

(--out also writes the raw runs as JSON beside it, allocators.json; ~4 minutes at 2 rounds
of 5 reps on a quiet 2-core machine, ~1.5 at 1 round of 2.)

Why: a CPU forward or train step allocates tens to hundreds of MB of activations and
frees them again. glibc serves every block over its mmap threshold (at most 32 MB) with
fresh pages from the kernel and hands smaller ones back when the heap's top is trimmed,
so the next call faults them in again: the kernel zeroes each 4 KiB page and maps it.
Inception-v3 at batch 32 faults ~200,000 pages a forward (~800 MB) that way, eager or
swapped. An allocator that keeps freed pages mapped takes that off every call. The
allocator is chosen when the process starts, so each configuration runs in a child
process of its own (rounds interleave the configurations); inside a child, eager and
swapped alternate (bench.time_alternating, medians) on two jobs:
- pytorch-fid's network shape at batch 32: torchvision's inception_v3 (random weights and
  BN statistics), inference_mode, channels_last, against
  `swap_inception(model, convs=True)`;
- a torchvision googlenet train step at batch 16 (zero_grad, forward, cross-entropy,
  backward), channels_last, against the same swap.
A configuration whose library is not installed (Debian: libtcmalloc-minimal4,
libjemalloc2) is reported as missing, not skipped silently. Each row also gives the
median minor page faults per call (getrusage).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# glibc tuned: the threshold at its ceiling (32 MB), and neither trimming nor top padding
# handing pages back (README, "The allocator").
GLIBC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
               "MALLOC_TOP_PAD_": "268435456"}


def configurations() -> dict[str, dict[str, str] | None]:
    """Name -> extra environment, or None where the allocator's library is not found."""
    def preload(name: str) -> dict[str, str] | None:
        found = ctypes.util.find_library(name)
        return {"LD_PRELOAD": found} if found else None

    return {"glibc (default)": {}, "glibc, INCEPTION_FAST_HUGE_PAGES=0": {"INCEPTION_FAST_HUGE_PAGES": "0"},
            "glibc, MALLOC_* tuned": dict(GLIBC_TUNED),
            "glibc, THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
            "tcmalloc (LD_PRELOAD)": preload("tcmalloc_minimal") or preload("tcmalloc"),
            "jemalloc (LD_PRELOAD)": preload("jemalloc")}


def child(reps: int) -> dict:
    """Both jobs in this process, as it was started: {job: {contender: [ms, faults]}}."""
    import copy

    import torch

    from inception_fast.bench import _inception_v3, time_alternating
    from inception_fast.bench_train import _googlenet, train_step
    from inception_fast.swap import swap_inception

    cl = torch.channels_last
    result = {}
    torch.manual_seed(0)
    model = _inception_v3().eval().to(memory_format=cl)
    swapped = swap_inception(copy.deepcopy(model), convs=True).eval()
    x = torch.randn(32, 3, 299, 299).contiguous(memory_format=cl)
    faults: dict[str, float] = {}
    with torch.inference_mode():
        seconds = time_alternating({"eager": lambda: model(x), "swapped": lambda: swapped(x)}, reps=reps, warmup=1,
                                   faults=faults)
    result["inception_v3 inference, batch 32"] = {k: [s * 1e3, faults.get(k)] for k, s in seconds.items()}
    del model, swapped, x

    torch.manual_seed(0)
    model = _googlenet().train().to(memory_format=cl)
    swapped = swap_inception(copy.deepcopy(model), convs=True).train()
    x = torch.randn(16, 3, 224, 224).contiguous(memory_format=cl)
    target = torch.randint(0, 1000, (16,))

    faults = {}
    seconds = time_alternating({"eager": train_step(model, x, target), "swapped": train_step(swapped, x, target)},
                               reps=reps + 1, warmup=2, faults=faults)
    result["googlenet train step, batch 16"] = {k: [s * 1e3, faults.get(k)] for k, s in seconds.items()}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration, interleaved")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per contender in each run")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.reps)))
        return 0
    from inception_fast.bench import other_processes_busy

    configs = configurations()
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    busy = other_processes_busy()  # cores other processes keep busy: these timings need a quiet machine
    for r in range(args.rounds):
        for name, env in configs.items():
            if env is None:
                continue
            print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps)],
                                 env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name}: the child process failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    jobs = list(next(r for rs in runs.values() for r in rs))
    # Per job: eager ms, swapped ms, swapped's speedup over eager, swapped's page faults.
    head = ["allocator"] + [f"{job}: {col}" if i == 0 else col for job in jobs
                            for i, col in enumerate(("eager ms", "swapped ms", "swapped vs eager", "page faults/call, swapped"))]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def spread(values: list[float], fmt: str = "{:.0f}") -> str:
        lo, hi = fmt.format(min(values)), fmt.format(max(values))
        return lo if lo == hi else f"{lo}–{hi}"

    for name, rs in runs.items():
        if not rs:
            lines.append(f"| {name} | " + " | ".join(["library not found"] * (len(head) - 1)) + " |")
            continue
        cells = []
        for job in jobs:
            faults = [r[job]["swapped"][1] for r in rs]
            cells += [spread([r[job]["eager"][0] for r in rs]), spread([r[job]["swapped"][0] for r in rs]),
                      spread([r[job]["eager"][0] / r[job]["swapped"][0] for r in rs], "{:.2f}×"),
                      "–" if None in faults else spread(faults)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    from inception_fast.bench import machine_info

    machine = machine_info("cpu")
    runs_word = "run" if args.rounds == 1 else "runs"
    table = "\n".join(lines) + (f"\n\n{args.rounds} {runs_word} per allocator (a range where they differ), {args.reps} "
                                f"alternating reps each. Machine: {machine['cpu']}, {machine['threads']} threads, "
                                f"torch {machine['torch']}, {machine['date']}."
                                + (f" **Other processes kept {busy:.2f} cores busy when this run began: these "
                                   "timings are not reliable.**" if busy is not None and busy >= 0.25 else ""))
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
