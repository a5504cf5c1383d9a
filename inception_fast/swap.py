"""swap_inception: one generic walker that puts FusedInception into any model."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ._checks import check_choice
from ._dropin import hooks_or_parametrizations
from .blocks import NotAnInceptionBlock
from .fused import FusedInception
from .fused_graph import FusedBranchGraph, torchvision_graph_layout
from .ops.inception import BACKENDS

__all__ = ["swap_inception"]

log = logging.getLogger("inception_fast")

# Containers route to their children; their own forward is never an Inception block.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Relative L2 error the swap-time self-check allows, by the block's dtype: fused and
# original both round in that dtype, so the bound is a few times either one's own error.
SELF_CHECK_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _is_candidate(module: nn.Module) -> bool:
    """Worth a structural check: four or more children (four branches, or Inception-v3's
    units), not a container and not already fused. Recognition itself is by the traced
    computation (blocks.py, fused_graph.py), never by class."""
    if isinstance(module, (*_CONTAINERS, FusedInception, FusedBranchGraph)):
        return False
    return len(module._modules) >= 4


def _fuse(module: nn.Module, backend: str) -> nn.Module:
    """The fused twin of a block: a block computing torchvision's Inception-v3 InceptionA
    to E on the branch-graph kernel, one computing GoogLeNet's Inception on FusedInception."""
    found = torchvision_graph_layout(module)
    if found is not None:  # handed on: the block is traced and compared once
        return FusedBranchGraph(module, backend, _layout=found).train(module.training)
    return FusedInception.from_module(module, backend)


def _refusal(block: nn.Module) -> str | None:
    """Why a block cannot be swapped although it computes an Inception module, or None."""
    for name, m in block.named_modules():
        reason = hooks_or_parametrizations(m)
        if reason is not None:
            where = f"{name} has" if name else "the block has"
            return f"{where} {reason}, which the fused kernel would bypass"
    return None


def _self_check_error(block: nn.Module, fused: nn.Module) -> float:
    """Relative L2 error of the fused block against the original on a random 7x7 input, in
    eval mode, in the block's dtype and on its device; the block itself is not touched."""
    param = next(block.parameters())
    # A private generator: swapping must not move the user's random stream.
    generator = torch.Generator(param.device).manual_seed(0)
    x = torch.randn(2, fused.spec.in_channels, 7, 7, device=param.device, dtype=param.dtype, generator=generator)
    twin = copy.deepcopy(block).eval()  # eval: BN folded; the copy keeps block's mode and stats
    fused_twin = type(fused).from_module(twin, fused.backend).eval()
    with torch.no_grad():
        want, got = twin(x), fused_twin(x)
    if want.shape != got.shape:
        return float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def swap_inception(model: nn.Module, backend: str = "auto", verify: float | None = None) -> nn.Module:
    """Replace every Inception block of `model` in place by a fused one; return `model`.

    Blocks are recognised by what their torch.fx-traced forward computes, whatever their
    class: GoogLeNet's Inception becomes FusedInception, torchvision's Inception-v3
    InceptionA to E become FusedBranchGraph. The fused block shares the original's
    parameters and buffers, so state_dict keys and values are unchanged.

    Every fused block is checked against its original on a random input at swap time (in
    the block's dtype; relative L2 error within SELF_CHECK_RTOL, or `verify` when that is
    tighter). A block that fails, that cannot be proven equivalent, or that carries hooks or
    parametrizations (prune, weight/spectral norm) is left alone, and the log says why.

    Raises TypeError (model not a module, or itself a block) and ValueError (backend,
    verify) before touching the model.
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
            if (reason := _refusal(module)) is not None:
                raise NotAnInceptionBlock(reason, near_miss=True)
            param = next(module.parameters())
            rtol = min(SELF_CHECK_RTOL.get(param.dtype, 1e-4), verify or float("inf"))
            if param.is_meta:  # nothing to compute with: the traced structure is the proof
                log.debug("swap_inception: %s is on the meta device: not checked numerically", name)
            elif not (err := _self_check_error(module, fused)) <= rtol:  # NaN fails too
                raise NotAnInceptionBlock(f"the fused block differs from the original by {err:.2e} relative "
                                          f"on a random input (> {rtol:g}), so it is not the same computation",
                                          near_miss=True)
        except NotAnInceptionBlock as reason:
            # A hook or parametrization also changes what tracing sees: say that, not its effect.
            if reason.near_miss and (refusal := _refusal(module)) is not None:
                reason = NotAnInceptionBlock(refusal, near_miss=True)
            if reason.near_miss or all(hasattr(module, f"branch{i}") for i in range(1, 5)):
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
