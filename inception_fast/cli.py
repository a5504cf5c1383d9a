"""Command line: python -m inception_fast demo|profile|verify|bench|fid-bench|traffic|gpu-check.

Bad arguments (and gpu-check without a GPU) print one line and exit 2; a failed
check (budget exceeded, verification past tolerance, FIDs that disagree, a gpu-check
failure) exits 1.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .models import googlenet_paper

MODELS = ("googlenet_paper", "googlenet", "inception_v3", "resnet50", "vgg16", "alexnet")
RESULTS_DIR = Path("benchmarks/results")


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2."""


def _randomize_bn_(model: nn.Module) -> nn.Module:
    # Untrained BN statistics (mean 0, var 1) would make BN folding trivially right.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def build_model(name: str) -> nn.Module:
    """A model by CLI name (random weights, random BN statistics) or `package.module:factory`."""
    if name == "googlenet_paper":
        return googlenet_paper()
    if name in MODELS:
        import torchvision.models as tvm

        kwargs = {"weights": None}
        if name in ("googlenet", "inception_v3"):
            kwargs |= {"aux_logits": False, "init_weights": True}
        return _randomize_bn_(getattr(tvm, name)(**kwargs))
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"MODEL must be one of {', '.join(MODELS)} or 'package.module:factory', got {name!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"MODEL {name!r} does not import: {exc}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"MODEL factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def parse_shape(text: str, dims: int | None = 4) -> tuple[int, ...]:
    """--input as a shape: `dims` positive ints (any number of them when dims is None)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--input must be comma-separated positive ints like 1,3,224,224, got {text!r}") from None
    if min(shape) < 1 or (dims is not None and len(shape) != dims):
        raise UsageError(f"--input must be {dims or 'comma-separated'} positive ints"
                         f"{' N,C,H,W' if dims == 4 else ''}, got {text!r}")
    return shape


def _csv(kind: Callable[[str], object], choices: tuple | None = None):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list from {choices}, got {text!r}")
        return values

    return parse


# -- subcommands ---------------------------------------------------------------


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile import ModelDoesNotRun, profile

    model = build_model(args.model).eval()
    try:
        report = profile(model, parse_shape(args.input, dims=None), budget=args.budget, depth=args.depth,
                         include_aux=args.include_aux, dtype=getattr(torch, args.dtype) if args.dtype else None,
                         meta=args.meta, nested=args.nested, backward=args.backward)
    except ModelDoesNotRun as exc:  # an input size the model cannot take: a bad argument, one line
        raise UsageError(f"--input {args.input}: {exc}") from None
    print({"md": report.to_markdown, "json": report.to_json, "csv": report.to_csv}[args.format]())
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if report.within_budget else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from .swap import swap_inception
    from .verify import verify

    original = build_model(args.model).eval()
    swapped = swap_inception(copy.deepcopy(original), backend=args.backend)
    report = verify(original, swapped, torch.randn(parse_shape(args.input)), rtol=args.rtol)
    print(report.to_markdown())
    if not report.blocks:
        print(f"\nno block of {args.model} was fused, so nothing was checked (see the log for blocks left unfused)")
    print(f"\n{len(report.blocks)} fused block(s); {'PASS' if report.ok else 'FAIL'} at rtol {args.rtol:g}")
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_blocks, print_progress

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "float16" and args.device == "cpu":
        # Measured: a 2048^3 fp16 torch.mm did not finish in 15 minutes on an AVX-512 CPU
        # without AVX512-FP16, and the eager peers are as slow.
        raise UsageError("--dtype float16 on the CPU: the fp16 GEMM ceiling did not finish in 15 minutes on a CPU "
                         "without AVX512-FP16, nor do the eager fp16 peers run fast; "
                         "benchmarks/half_precision_cpu.py fp16 times the fused fp16 blocks")
    if args.convs and not args.whole_networks:
        raise UsageError("--convs applies to --whole-networks only (the block benchmarks swap blocks)")
    if args.train:
        return _bench_train(args)
    if args.v3:
        return _bench_v3(args)
    if args.whole_networks:
        return _bench_whole_networks(args)
    blocks = args.blocks or (["3a", "4a", "5b"] if args.quick else list(_block_names()))
    batches = args.batch or ([1, 8] if args.quick else [1, 32])
    report = bench_blocks(
        blocks, batches, dtype=getattr(torch, args.dtype), backend=args.backend,
        with_compile=not args.no_compile, reps=5 if args.quick else args.reps, progress=print_progress,
        device=args.device, backward=args.backward,
    )
    print(report.to_markdown())
    data = report.to_json_dict()
    markdown = report.to_markdown()
    if args.networks:
        from .bench import bench_networks, networks_markdown

        data["networks"] = bench_networks(args.networks, with_compile=not args.no_compile, progress=print_progress,
                                          device=args.device, dtype=getattr(torch, args.dtype))
        markdown += "\n\nWhole network, forward, same process and method:\n\n" + networks_markdown(data["networks"])
        print("\nWhole network" + markdown.split("\n\nWhole network", 1)[1])
    # Each dtype has its own README table (bench, bench_bfloat16, ...).
    section = "backward" if args.backward else "bench" if args.dtype == "float32" else f"bench_{args.dtype}"
    _write_results(args, report, data, markdown, section)
    return 0


def _bench_whole_networks(args: argparse.Namespace) -> int:
    """Whole torchvision googlenet (batches 1, 16) and inception_v3 (1, 8), channels_last:
    eager, fused eager, compile(model) and compile(swap(model)), with compile times."""
    from .bench import bench_networks, networks_markdown, print_progress

    if args.device != "cpu" or args.dtype != "float32":
        raise UsageError("--whole-networks runs on the CPU in float32: drop --device and --dtype")
    rows = []
    for model, batches in (("torchvision googlenet", [1, 16]), ("torchvision inception_v3", [1, 8])):
        rows += bench_networks(batches, reps=args.reps, progress=print_progress, model=model, convs=args.convs)
    markdown = networks_markdown(rows)
    print(markdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "networks.json").write_text(json.dumps(rows, indent=2))
    (out / "networks.md").write_text(markdown + "\n")
    print(f"wrote {out}/networks.json, networks.md", file=sys.stderr)
    if args.write_readme:
        _write_readme_section(Path("README.md"), "networks-convs" if args.convs else "networks", markdown)
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    """Training with batch norm: torchvision GoogLeNet's blocks forward + backward (batch 32)
    and whole train steps of googlenet (batches 16, 32) and inception_v3 (8)."""
    from .bench_train import bench_train_blocks, bench_train_steps, train_steps_markdown
    from .bench import print_progress

    if args.device != "cpu" or args.dtype != "float32" or args.v3 or args.whole_networks or args.backward:
        raise UsageError("--train runs on the CPU in float32, alone: drop --device, --dtype, --v3, "
                         "--whole-networks and --backward")
    blocks = args.blocks or (["3a", "4a", "5b"] if args.quick else list(_block_names()))
    batches = args.batch or ([8] if args.quick else [32])
    report = bench_train_blocks(blocks, batches, reps=3 if args.quick else args.reps, progress=print_progress)
    steps = [("torchvision googlenet", 16)] if args.quick else [
        ("torchvision googlenet", 16), ("torchvision googlenet", 32), ("torchvision inception_v3", 8)]
    rows = bench_train_steps(steps, reps=3 if args.quick else max(3, args.reps // 2), progress=print_progress)
    markdown = (report.to_markdown() + "\n\nWhole train step (zero_grad, forward, cross-entropy, backward), "
                "same process and method:\n\n" + train_steps_markdown(rows))
    print(markdown)
    data = report.to_json_dict() | {"train_steps": rows}
    _write_results(args, report, data, markdown, "train")
    return 0


def _write_results(args: argparse.Namespace, report, data: dict, markdown: str, readme_section: str) -> None:
    """bench.{json,csv,md} and the chart into --out; with --write-readme, README's section too."""
    from .plots import plot_speedups

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(data, indent=2))
    (out / "bench.md").write_text(markdown + "\n")
    (out / "bench.csv").write_text(report.to_csv())
    plot_speedups(report, out / "bench_speedup.png")
    print(f"wrote {out}/bench.json, bench.csv, bench.md, bench_speedup.png", file=sys.stderr)
    if args.write_readme:
        _write_readme_section(Path("README.md"), readme_section, markdown)


def _bench_v3(args: argparse.Namespace) -> int:
    """Inception-v3's fused blocks, and with --networks the whole swapped inception_v3."""
    from .bench import bench_networks, bench_v3_blocks, networks_markdown, print_progress

    if args.device != "cpu" or args.dtype != "float32":
        raise UsageError("--v3 runs the CPU kernels in float32: drop --device and --dtype")
    if args.backward and args.networks:
        raise UsageError("--v3 --backward times the blocks only: drop --networks")
    report = bench_v3_blocks(args.batch or [1, 32], with_compile=not args.no_compile,
                             reps=5 if args.quick else args.reps, progress=print_progress, backward=args.backward)
    markdown = report.to_markdown()
    data = report.to_json_dict()
    if args.networks:
        data["networks"] = bench_networks(args.networks, with_compile=not args.no_compile, progress=print_progress,
                                          model="torchvision inception_v3")
        markdown += "\n\nWhole network, forward, same process and method:\n\n" + networks_markdown(data["networks"])
    print(markdown)
    _write_results(args, report, data, markdown, "v3_backward" if args.backward else "v3")
    return 0


def _write_readme_section(readme: Path, name: str, body: str) -> None:
    """Replace the lines between a `<!-- name:start -->` line and the next `<!-- name:end -->`
    line. Only markers alone on their line count: prose that quotes a marker is left alone
    (matching one inside a sentence once spliced a table into it)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    lines = readme.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == start]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise UsageError(f"{readme} needs exactly one {start} line and one {end} line after it, got "
                         f"{len(starts)} and {len(ends)}")
    lines[starts[0] + 1:ends[0]] = [body.rstrip("\n") + "\n"]
    readme.write_text("".join(lines))
    print(f"updated the {name} section of {readme}", file=sys.stderr)


def cmd_fid_bench(args: argparse.Namespace) -> int:
    """pytorch-fid's InceptionV3 and timm's inception_v3 over N images: eager, swapped,
    compile, compile(swapped); features/s, feature error and FID agreement (fid.py)."""
    from .bench import print_progress
    from .fid import CONTENDERS, fid_bench

    for name in ("pytorch_fid", "timm", "scipy"):
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"fid-bench needs pytorch-fid, timm and scipy (the [test] extras): {name} is missing")
    if args.images < 2 or args.batch < 1 or args.rounds < 1:
        raise UsageError(f"--images must be at least 2 (two per set for a covariance), --batch and --rounds at "
                         f"least 1, got {args.images}, {args.batch}, {args.rounds}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"--weights {args.weights}: no such file")
    readme = Path("README.md")
    if args.write_readme and not (readme.is_file() and "<!-- fid:start -->" in readme.read_text()):
        raise UsageError("--write-readme: README.md here has no <!-- fid:start --> ... <!-- fid:end --> markers")
    contenders = ("eager", "swapped") if args.no_compile else CONTENDERS
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"--device must be cpu or cuda (with a CUDA GPU), got {args.device!r}"
                         + (": this machine has no CUDA GPU" if args.device == "cuda" else ""))
    report = fid_bench(args.images, batch=args.batch, weights=args.weights, contenders=contenders,
                       rounds=args.rounds, progress=print_progress, device=args.device, convs=not args.blocks_only)
    markdown = report.to_markdown()
    print(markdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid.json").write_text(json.dumps(report.to_json_dict(), indent=2))
    (out / "fid.md").write_text(markdown + "\n")
    print(f"wrote {out}/fid.json, fid.md", file=sys.stderr)
    if args.write_readme:
        _write_readme_section(readme, "fid", markdown)
    return 0 if report.ok else 1


def cmd_traffic(args: argparse.Namespace) -> int:
    import torchvision

    from .bench import V3_BLOCKS
    from .fused_graph import FusedBranchGraph
    from .spec import GOOGLENET_INCEPTION
    from .traffic import traffic

    blocks = [(f"googlenet {name}", b.spec, b.size) for name, b in GOOGLENET_INCEPTION.items()]
    with torch.device("meta"):  # shapes only: no weights are made
        v3 = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    blocks += [(f"inception_v3 {name}", FusedBranchGraph(getattr(v3, name)).spec, size)
               for name, size in V3_BLOCKS.items()]
    print("| block | batch | minimum (MB) | fused / minimum | eager / minimum |\n|---|---|---:|---:|---:|")
    for name, spec, size in blocks:
        for batch in args.batch:
            t = traffic(spec, size, size, batch, bytes_per_element=args.bytes)
            print(f"| {name} | {batch} | {t.minimum / 1e6:.2f} | {t.fused_ratio:.2f}× | {t.eager_ratio:.2f}× |")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .bench import bench_blocks, machine_info, print_progress
    from .profile import profile
    from .swap import swap_inception
    from .verify import verify

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"# inception_fast demo\n\nMachine: {machine_info()}\n")
    ok = True
    for name in ("googlenet", "googlenet_paper"):
        print_progress(f"swapping fused Inception blocks into {name} and verifying them ...")
        original = build_model(name).eval()
        swapped = swap_inception(copy.deepcopy(original))
        report = verify(original, swapped, torch.randn(2, 3, 224, 224))
        print(f"## {name}: fused blocks against the original, batch 2, 224×224\n\n{report.to_markdown()}\n")
        ok &= report.ok
    print_progress("profiling googlenet_paper ...")
    print("## Multiply-add budget of googlenet_paper (paper: 1.5 G)\n")
    print(profile(googlenet_paper().eval(), (1, 3, 224, 224), budget=1.5e9).to_markdown() + "\n")
    print("## Short benchmark (medians, alternating providers; `make bench` for the full table)\n")
    report = bench_blocks(["3a", "4a", "5b"], [1, 8], with_compile=False, reps=5, progress=print_progress)
    print(report.to_markdown())
    print(f"\n## The same in bfloat16 (the C++ kernel's bf16 path here: {report.machine['bf16_kernel']})\n")
    report = bench_blocks(["3a", "5b"], [8], dtype=torch.bfloat16, with_compile=False, reps=5,
                          progress=print_progress)
    print(report.to_markdown())
    print(f"\nverification: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from .gpu_check import SECTIONS, GpuCheck, check_device

    if args.quick and args.tiny:
        raise UsageError("--quick and --tiny exclude each other")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    try:
        device = check_device(mode)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    check = GpuCheck(mode, Path(args.out), device, args.sections or SECTIONS, args.time_limit)
    return 0 if check.run() else 1


def _block_names():
    from .spec import GOOGLENET_INCEPTION

    return GOOGLENET_INCEPTION.keys()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inception_fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{demo,profile,verify,bench,fid-bench,traffic,gpu-check}")

    p = sub.add_parser("demo", help="swap fused blocks into GoogLeNet, verify, profile, benchmark")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("profile", help="params and multiply-adds per layer, against a budget")
    p.add_argument("model", help=f"{'|'.join(MODELS)} or package.module:factory")
    p.add_argument("--input", default="1,3,224,224", help="input shape, e.g. N,C,H,W (1,3,224,224) or N,T (1,128)")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16", "int64", "int32"), default=None,
                   help="dtype of the random input (default: the model's); int64/int32: token ids")
    p.add_argument("--budget", type=float, default=None, help="MACs; exit 1 when the total exceeds it")
    p.add_argument("--format", choices=("md", "json", "csv"), default="md")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of MACs per layer")
    p.add_argument("--depth", type=int, default=1, help="rows this many levels below the model")
    p.add_argument("--nested", action="store_true", help="also show the parents down to --depth, with subtotals")
    p.add_argument("--include-aux", action="store_true", help="count auxiliary heads in the total")
    p.add_argument("--backward", action="store_true", help="also count the backward of one training step")
    p.add_argument("--meta", action="store_true", help="count on the meta device: shapes only, nothing computed")
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser("verify", help="swap fused blocks into a model and compare block by block")
    p.add_argument("model", help=f"{'|'.join(MODELS)} or package.module:factory")
    p.add_argument("--input", default="2,3,224,224", help="input shape N,C,H,W")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative L2 tolerance (exit 1 past it)")
    p.add_argument("--backend", choices=("auto", "cpu", "reference", "triton"), default="auto")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("traffic", help="modelled DRAM bytes of the fused GPU forward against the minimum")
    p.add_argument("--batch", type=_csv(int), default=[1, 256])
    p.add_argument("--bytes", type=int, default=2, help="bytes per element (2: fp16/bf16)")
    p.set_defaults(run=cmd_traffic)

    p = sub.add_parser("bench", help="fused blocks against eager and torch.compile, as ratios")
    p.add_argument("--quick", action="store_true",
                   help="three blocks, batch 1 and 8, 5 reps (with --train: batch 8, 3 reps, one googlenet step at "
                        "batch 16)")
    p.add_argument("--blocks", type=_csv(str, tuple(_block_names())), default=None)
    p.add_argument("--batch", type=_csv(int), default=None)
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda times with CUDA events (triton.testing.do_bench)")
    p.add_argument("--backend", choices=("auto", "cpu", "reference", "triton"), default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--backward", action="store_true", help="time forward+backward (train mode)")
    p.add_argument("--networks", type=_csv(int), default=None, metavar="BATCHES",
                   help="also time a whole swapped torchvision GoogLeNet at these batch sizes")
    p.add_argument("--whole-networks", action="store_true",
                   help="only whole networks: googlenet (batch 1, 16) and inception_v3 (1, 8), eager, fused, "
                        "compile(model) and compile(swap(model))")
    p.add_argument("--convs", action="store_true",
                   help="with --whole-networks: swap_inception(model, convs=True), the stem's conv units fused too")
    p.add_argument("--train", action="store_true",
                   help="training with batch norm: torchvision GoogLeNet's blocks forward+backward (train mode) and "
                        "whole train steps of googlenet and inception_v3, swapped against eager")
    p.add_argument("--v3", action="store_true",
                   help="Inception-v3's fused blocks (InceptionA/C/E) instead of GoogLeNet's; with --networks, "
                        "the whole swapped inception_v3")
    p.add_argument("--out", default=str(RESULTS_DIR),
                   help=f"folder for bench.json, .csv, .md and the plot (default: {RESULTS_DIR}, relative to the "
                        "working directory: in a clone, the tracked results)")
    p.add_argument("--write-readme", action="store_true", help="also replace README.md's benchmark table")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("fid-bench", help="the FID workflow: pytorch-fid's and timm's Inception-v3 over N images, "
                                         "eager / swapped / compile / compile(swapped), features/s and FID agreement")
    p.add_argument("--images", type=int, default=100, metavar="N", help="images per set (two sets)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="pytorch-fid's state dict (pt_inception-2015-12-05-6726825d.pth); default: random weights")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per contender, alternating (medians)")
    p.add_argument("--no-compile", action="store_true", help="eager and swapped only")
    p.add_argument("--blocks-only", action="store_true",
                   help="swap the Inception blocks only (swap_inception(model)); default: the stem's conv units "
                        "too (convs=True)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (PyTorch's TF32 flags as they are)")
    p.add_argument("--out", default=str(RESULTS_DIR / "fid"),
                   help=f"folder for fid.json and fid.md (default: {RESULTS_DIR / 'fid'}, relative to the working "
                        "directory)")
    p.add_argument("--write-readme", action="store_true", help="also replace README.md's fid section")
    p.set_defaults(run=cmd_fid_bench)

    from .gpu_check import SECTIONS

    p = sub.add_parser("gpu-check", help="every Triton path against fp64, then timed, on one GPU: JSON + markdown")
    p.add_argument("--out", default=str(RESULTS_DIR / "gpu_check"), help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--quick", action="store_true", help="fewer cases and no torch.compile (under 4 min)")
    p.add_argument("--tiny", action="store_true",
                   help="the CPU self-test of `make test`, under TRITON_INTERPRET=1: tiny specs, fp32, 1-rep timing")
    p.add_argument("--sections", type=_csv(str, SECTIONS), default=None,
                   help=f"run only these (comma-separated, of {','.join(SECTIONS)}), in the usual order")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no timing work that would end later than this after the start "
                        "(default 510, --quick 210; correctness always runs in full)")
    p.set_defaults(run=cmd_gpu_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, TypeError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
