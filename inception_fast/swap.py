"""swap_inception: one generic walker that puts FusedInception into any model."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ._checks import check_choice
from .blocks import NotAnInceptionBlock, inception_classes
from .fused import FusedInception
from .fused_graph import FusedBranchGraph, torchvision_graph_layout
from .ops.inception import BACKENDS

__all__ = ["swap_inception"]

log = logging.getLogger("inception_fast")

# Containers route to their children; their own forward is never an Inception block.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_candidate(module: nn.Module) -> bool:
    """Worth a structural check: a known block class, torchvision-style branch names, or a
    non-container with at least four children (four branches)."""
    if isinstance(module, inception_classes()) or all(hasattr(module, f"branch{i}") for i in range(1, 5)):
        return True
    return not isinstance(module, (*_CONTAINERS, FusedInception, FusedBranchGraph)) and len(list(module.children())) >= 4


def _fuse(module: nn.Module, backend: str) -> nn.Module:
    """The fused twin of a block: Inception-v3's InceptionA to E on the branch-graph kernel,
    any GoogLeNet-style block on FusedInception."""
    if torchvision_graph_layout(module) is not None:
        return FusedBranchGraph.from_module(module, backend)
    return FusedInception.from_module(module, backend)


def _numerically_equal(block: nn.Module, fused: nn.Module) -> float:
    """Relative error of the fused block against the original on a random 7x7 input (eval)."""
    param = next(block.parameters())
    x = torch.randn(2, fused.spec.in_channels, 7, 7, device=param.device, dtype=param.dtype)
    twin = copy.deepcopy(block).eval()  # eval: BN folded; the copy keeps block's mode and stats
    fused_twin = type(fused).from_module(twin, fused.backend).eval()
    with torch.no_grad():
        want, got = twin(x), fused_twin(x)
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def swap_inception(model: nn.Module, backend: str = "auto", verify: float | None = None) -> nn.Module:
    """Replace every Inception block of `model` in place by a fused one; return `model`.

    GoogLeNet-style blocks become FusedInception; torchvision's Inception-v3 InceptionA to
    E become FusedBranchGraph.

    Blocks are recognised by structure (blocks.py), whatever their class. The fused
    block shares the original's parameters and buffers, so state_dict keys and values
    are unchanged. With `verify` (a relative tolerance), each block is also run against
    its fused twin on a random input before it is swapped. A block that cannot be proven
    equivalent is left alone, and the log says why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("backend", backend, BACKENDS)
    if verify is not None and not (isinstance(verify, float) and verify > 0):
        raise ValueError(f"verify must be a positive relative tolerance (float) or None, got {verify!r}")
    if isinstance(model, (FusedInception, FusedBranchGraph)):
        return model
    swapped, skipped = [], []
    # Collect first: replacing children while iterating named_modules is undefined.
    candidates = [(name, m) for name, m in model.named_modules() if _is_candidate(m)]
    replaced: list[str] = []
    for name, module in candidates:
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # inside a block that is already fused
        try:
            fused = _fuse(module, backend)
            if not name:  # the model itself is a block: it cannot replace itself in place
                raise TypeError("model is itself an Inception block; use FusedInception.from_module(model)")
            if verify is not None and (err := _numerically_equal(module, fused)) > verify:
                raise NotAnInceptionBlock(f"fused output differs by {err:.2e} relative (> verify={verify:g})",
                                          near_miss=True)
        except NotAnInceptionBlock as reason:
            known = isinstance(module, inception_classes()) or hasattr(module, "branch1")
            if known or reason.near_miss:
                skipped.append(name)
                log.warning("swap_inception: left %s (%s) unfused: %s", name or "<model>",
                            type(module).__name__, reason)
            else:
                log.debug("swap_inception: %s (%s) is not an Inception block: %s", name, type(module).__name__, reason)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fused)
        swapped.append(name)
        replaced.append(name)
    log.info("swap_inception: swapped %d block(s), left %d unfused", len(swapped), len(skipped))
    return model
