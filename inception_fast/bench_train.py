"""Training benchmarks with batch norm (`python -m inception_fast bench --train`): torchvision's
GoogLeNet blocks forward + backward in train mode, and whole train steps (forward,
cross-entropy, backward) of torchvision's googlenet and inception_v3, the swapped model
(the fused op's train-mode BN form, ops/branch_graph_bn_train.py) against eager
channels_last, alternating in one process, medians (bench.time_alternating).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from .bench import (BenchReport, CaseResult, _better_ceiling, _inception_v3, each_case, gemm_ceiling, machine_info,
                    time_alternating)

__all__ = ["bench_train_blocks", "bench_train_steps", "train_step", "train_steps_markdown"]

# torchvision googlenet's Inception modules and their input grids at 224x224.
GOOGLENET_GRIDS = {"3a": 28, "3b": 28, "4a": 14, "4b": 14, "4c": 14, "4d": 14, "4e": 14, "5a": 7, "5b": 7}


def _googlenet() -> torch.nn.Module:
    import torchvision

    return torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)


_MODELS = {"torchvision googlenet": (_googlenet, 224), "torchvision inception_v3": (_inception_v3, 299)}


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], object]:
    x = x.detach().requires_grad_()

    def step():
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return step


def train_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One train step of `model` as a callable: zero_grad, forward, cross-entropy against
    `target`, backward; each call re-seeds the RNG so that every contender draws the same
    dropout masks."""
    def run():
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
    return run


def bench_train_blocks(blocks: list[str], batches: list[int], reps: int = 10,
                       progress: Callable[[str], None] | None = None) -> BenchReport:
    """Each torchvision GoogLeNet block (conv + BN + ReLU units, random weights), train mode,
    forward + backward from one grad_output: the swapped block against eager
    channels_last and eager NCHW. MACs count the forward's three times (data and weight
    gradients)."""
    from .fused_graph import FusedBranchGraph
    from .swap import swap_inception

    model = _googlenet()
    ceiling = gemm_ceiling()
    cases = []
    for name, batch in each_case(blocks, batches, progress, "train block"):
        size = GOOGLENET_GRIDS[name]
        block = copy.deepcopy(getattr(model, f"inception{name}")).train()
        block_cl = copy.deepcopy(block).to(memory_format=torch.channels_last)
        fused = swap_inception(torch.nn.Sequential(copy.deepcopy(block)))[0].train()
        x = torch.randn(batch, fused.spec.in_channels, size, size)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            grad = torch.randn_like(block(x))
        grad_cl = grad.contiguous(memory_format=torch.channels_last)
        providers = {"fused": _fwd_bwd(fused, x_cl, grad_cl), "eager_channels_last": _fwd_bwd(block_cl, x_cl, grad_cl),
                     "eager_nchw": _fwd_bwd(block, x, grad)}
        faults: dict[str, float] = {}
        seconds = time_alternating(providers, reps=reps, faults=faults)
        macs = fused.spec.macs(size, size, batch)
        # Under the threshold the swapped block runs the original: say so in its row.
        below = batch * size * size < FusedBranchGraph.bn_train_min_pixels
        cases.append(CaseResult(block=f"{name} (original: below bn_train_min_pixels)" if below else name,
                                batch=batch, dtype="float32", backend="cpu",
                                macs=3 * getattr(macs, "total", macs),
                                ms={k: v * 1e3 for k, v in seconds.items()}, faults=faults))
    return BenchReport(machine=machine_info("cpu"), ceiling_gmacs=_better_ceiling(ceiling, torch.float32, "cpu"),
                       cases=cases)


def bench_train_steps(cases: list[tuple[str, int]], reps: int = 6,
                      progress: Callable[[str], None] | None = None) -> list[dict]:
    """One train step (zero_grad, forward, cross-entropy, backward) of each (model, batch):
    swap_inception(model) and swap_inception(model, convs=True) (the stem's conv units fused
    too) against the model itself, all channels_last, random weights, the same labels; each
    step re-seeds the dropout masks alike."""
    from .swap import swap_inception

    rows = []
    for model_name, batch in cases:
        if progress:
            progress(f"train step: {model_name}, batch {batch}")
        make, size = _MODELS[model_name]
        torch.manual_seed(0)
        original = make().train().to(memory_format=torch.channels_last)
        swapped = swap_inception(copy.deepcopy(original))
        swapped_convs = swap_inception(copy.deepcopy(original), convs=True)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,))

        faults: dict[str, float] = {}
        seconds = time_alternating({"fused": train_step(swapped, x, target),
                                    "fused_convs": train_step(swapped_convs, x, target),
                                    "eager_channels_last": train_step(original, x, target)}, reps=reps, faults=faults)
        eager = seconds["eager_channels_last"]
        rows.append({"model": model_name, "batch": batch, "ms": {k: v * 1e3 for k, v in seconds.items()},
                     "speedup": eager / seconds["fused"], "speedup_convs": eager / seconds["fused_convs"],
                     "page_faults": faults})
    return rows


def train_steps_markdown(rows: list[dict]) -> str:
    """The train-step table; a page-fault column (minor faults per step, median: eager /
    swapped / convs=True) where the rows have counts."""
    with_faults = any(r.get("page_faults") for r in rows)
    lines = ["| model | batch | eager CL ms | swapped ms | swapped, convs=True ms | swapped vs eager CL | "
             "convs=True vs eager CL |" + (" page faults/step eager / swapped / convs=True |" if with_faults else ""),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if with_faults else "")]
    for r in rows:
        ms = r["ms"]
        line = (f"| {r['model']} | {r['batch']} | {ms['eager_channels_last']:.0f} | {ms['fused']:.0f} | "
                f"{ms['fused_convs']:.0f} | {r['speedup']:.2f}× | {r['speedup_convs']:.2f}× |")
        if with_faults:
            f = r.get("page_faults") or {}
            line += (" " + " / ".join(f"{f[k]:.0f}" for k in ("eager_channels_last", "fused", "fused_convs")) + " |"
                     if all(k in f for k in ("eager_channels_last", "fused", "fused_convs")) else " – |")
        lines.append(line)
    return "\n".join(lines)
