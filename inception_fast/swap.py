"""swap_inception: one generic walker that puts FusedInception into any model."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ._checks import check_choice
from ._dropin import hooks_or_parametrizations
from .blocks import NotAnInceptionBlock, trace_block
from .fused import FusedInception
from .fused_graph import FusedBranchGraph, torchvision_graph_layout
from .graph_parse import parse_branch_graph
from .ops.backend import resolve_backend, triton_available
from .ops.inception import BACKENDS

__all__ = ["swap_inception"]

log = logging.getLogger("inception_fast")

# Containers route to their children; their own forward is never an Inception block.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Relative L2 error the swap-time self-check allows, by the block's dtype: fused and
# original both round in that dtype, so the bound is a few times either one's own error.
SELF_CHECK_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _is_candidate(module: nn.Module) -> bool:
    """Worth a structural check: two or more children (two branches, as timm's Mixed3a: a
    max pool and a conv unit) and at least two convolutions or pools below it, not a
    container and not already fused. A cheap filter only: recognition itself is by the
    traced computation (blocks.py, graph_parse.py, fused_graph.py), never by class."""
    if isinstance(module, (*_CONTAINERS, FusedInception, FusedBranchGraph)) or len(module._modules) < 2:
        return False
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    return sum(isinstance(m, kinds) for m in module.modules()) >= 2


def _is_lone_candidate(module: nn.Module) -> bool:
    """A conv unit of its own (torchvision's BasicConv2d, timm's ConvNormAct: a Conv2d and a
    BN, ReLU in the forward) that swap_inception(convs=True) may fuse: not a container, not
    fused, with exactly one convolution below it. Recognition is by the traced computation."""
    if isinstance(module, (*_CONTAINERS, FusedInception, FusedBranchGraph)) or not 2 <= len(module._modules) <= 3:
        return False
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) == 1


def _fuse_lone(module: nn.Module, backend: str) -> nn.Module:
    """The fused twin of a lone conv unit: one branch of one level over x, a 1x1, a K x K
    with 'same' padding or none at stride 1 (fp32: Winograd F(4x4, 3x3) or F(2x2, 3x3) for a
    3x3, by its grid), or a
    3x3/2 unpadded."""
    parsed = parse_branch_graph(module, trace_block(module), lone=True)
    spec = parsed[0]
    if len(spec.branches) != 1 or spec.pool is not None or len(spec.convs) != 1:
        raise NotAnInceptionBlock(f"{type(module).__name__}: not one conv unit over x")
    return FusedBranchGraph(module, backend, _parsed=parsed).train(module.training)


def _googlenet_shaped(spec) -> bool:
    """The branch graph of GoogLeNet's module, InceptionSpec.to_graph()'s shape:
    [1x1], [1x1, KxK], [1x1, KxK] and a 3x3/1 max pool with a 1x1, concatenated last."""
    levels = [[[(c.kh, c.kw) for c in level] for level in b.levels] for b in spec.branches]
    square = all(len(b) == 2 and len(b[1]) == 1 and b[1][0][0] == b[1][0][1] for b in levels[1:])
    return (spec.stride == 1 and spec.pool == "max" and spec.pool_index is None and len(levels) == 3
            and levels[0] == [[(1, 1)]] and square and all(b[0] == [(1, 1)] for b in levels[1:]))


def _fuse(module: nn.Module, backend: str) -> nn.Module:
    """The fused twin of a block, by the first parser that reads it: torchvision's
    Inception-v3 InceptionA to E (and pytorch-fid's pool variants) by graph comparison; then
    the general branch-graph parser (timm's Inception-v4 blocks, users' blocks); then the
    GoogLeNet parser. A block of GoogLeNet's shape that the GoogLeNet parser also reads
    becomes FusedInception, as before. When nothing reads it, the reason raised is the
    general parser's when it is a near miss (the block concatenates conv branches)."""
    try:
        found = torchvision_graph_layout(module)
    except NotAnInceptionBlock as exc:  # torchvision's children, another computation
        found, torchvision_reason = None, exc
    else:
        torchvision_reason = None
    if found is not None:  # handed on: the block is traced and compared once
        return FusedBranchGraph(module, backend, _layout=found).train(module.training)
    traced = trace_block(module)
    try:
        parsed = parse_branch_graph(module, traced)
    except NotAnInceptionBlock as general:
        if torchvision_reason is not None:
            raise (general if general.near_miss else torchvision_reason) from None
        try:
            return FusedInception._from_traced(module, traced, backend)
        except NotAnInceptionBlock as googlenet:
            raise (googlenet if googlenet.near_miss and not general.near_miss else general) from None
    if _googlenet_shaped(parsed[0]):
        try:
            return FusedInception._from_traced(module, traced, backend)
        except NotAnInceptionBlock:
            pass  # e.g. batch norm on some convolutions only: the branch graph runs it
    return FusedBranchGraph(module, backend, _parsed=parsed).train(module.training)


def _refusal(block: nn.Module) -> str | None:
    """Why a block cannot be swapped although it computes an Inception module, or None."""
    for name, m in block.named_modules():
        reason = hooks_or_parametrizations(m)
        if reason is not None:
            where = f"{name} has" if name else "the block has"
            return f"{where} {reason}, which the fused kernel would bypass"
    return None


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# Where the original's own error may excuse a fused block's distance from it (_self_check):
# the tolerance table's reduced-precision limits (TF32 for fp32; fp16; bf16). An original
# further than this from fp64 (overflow, cancellation) excuses nothing.
_ROUNDING_LIMIT = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# Half precision: one rounding's relative error (unit roundoff). Against fp64 a fused
# block in these dtypes must also stay within 2x the original's error (the tolerance
# table's rule), or within this when the original happens to land closer.
_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _self_check(block: nn.Module, fused: nn.Module, rtol: float, fallback: bool = True) -> str | None:
    """Why the fused block is not the original's computation, or None: on a random 7x7
    input, in eval mode, in the block's dtype and on its device (the block itself is not
    touched), the fused output is within `rtol` (relative L2) of the original's, or, failing
    that and with `fallback`, both are near the original run in fp64: the original within
    _ROUNDING_LIMIT of it (its dtype's rounding explains its error), the fused block within
    max(rtol, 2x the original's error) and within _ROUNDING_LIMIT too.

    The second rule is for an original that rounds more than the kernel: on GPUs PyTorch
    runs fp32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), ~5e-4 off
    fp64, while the fused kernel follows torch.backends.cuda.matmul.allow_tf32 (default
    exact fp32) -- the tolerance table's "at most 2x eager's own error" (DESIGN rule).

    In fp16 and bf16 that rule also holds when the first passes: the fused block within
    max(2x the original's error against fp64, one unit roundoff). Two half-precision runs
    can sit within rtol of each other while one is several times the other's error from
    the truth (a BN fold rounded in bf16 was: 2.1e-2 from the original, 8x its error)."""
    param = next(block.parameters())
    # A private generator: swapping must not move the user's random stream.
    generator = torch.Generator(param.device).manual_seed(0)
    # 7x7, or larger where an unpadded kernel needs it (a 9x9 'valid' conv takes at least 9x9).
    graph = getattr(fused, "graph", None)
    size = max([7] + [max(c.kh, c.kw) + 2 for c in (graph.convs if graph is not None else ())])
    x = torch.randn(2, fused.spec.in_channels, size, size, device=param.device, dtype=param.dtype,
                    generator=generator)
    twin = copy.deepcopy(block).eval()  # eval: BN folded; the copy keeps block's mode and stats
    fused_twin = type(fused).from_module(twin, fused.backend).eval()
    with torch.no_grad():
        want, got = twin(x), fused_twin(x)
    if want.shape != got.shape:
        return f"the fused block's output is {tuple(got.shape)}, the original's {tuple(want.shape)}"
    err = _rel(got, want)
    if err <= rtol and param.dtype not in _UNIT_ROUNDOFF:
        return None

    def against_fp64() -> tuple[float, float]:
        """(fused, original) relative errors against the original run in fp64."""
        with torch.no_grad():
            exact = copy.deepcopy(twin).double()(x.double())
        return _rel(got, exact), _rel(want, exact)

    detail = ""
    if err <= rtol:
        fused_err, original_err = against_fp64()
        if fused_err <= max(2 * original_err, _UNIT_ROUNDOFF[param.dtype]):  # NaN fails
            return None
        return (f"against fp64 on a random input the fused block is off by {fused_err:.2e}, more than twice "
                f"the original's {original_err:.2e} in {str(param.dtype).removeprefix('torch.')}")
    limit = _ROUNDING_LIMIT.get(param.dtype)
    if fallback and limit is not None and torch.isfinite(got).all():
        fused_err, original_err = against_fp64()
        if original_err <= limit and fused_err <= min(limit, max(rtol, 2 * original_err)):  # NaN fails
            return None
        detail = f"; against fp64 the fused block is off by {fused_err:.2e}, the original by {original_err:.2e}"
    return (f"the fused block differs from the original by {err:.2e} relative on a random input (> {rtol:g})"
            f"{detail}, so it is not the same computation")


def swap_inception(model: nn.Module, backend: str = "auto", verify: float | None = None,
                   convs: bool = False) -> nn.Module:
    """Replace every Inception block of `model` in place by a fused one; return `model`.

    Blocks are recognised by what their torch.fx-traced forward computes, whatever their
    class: GoogLeNet's Inception becomes FusedInception; torchvision's Inception-v3
    InceptionA to E, and any other block whose forward concatenates conv-unit branches and
    one pool branch (graph_parse.py: timm's Inception-v4 blocks, a user's own) become
    FusedBranchGraph. The fused block shares the original's
    parameters and buffers, so state_dict keys and values are unchanged.

    Every fused block is checked against its original on a random input at swap time (in
    the block's dtype; relative L2 error within SELF_CHECK_RTOL, or `verify` when that is
    tighter; or, without `verify`, where the original itself rounds more than the kernel, as
    fp32 convolutions in cuDNN's default TF32 do, within 2x the original's own error against
    fp64, an error its dtype's rounding explains). A block that fails, that cannot be proven
    equivalent, that carries hooks or parametrizations (prune, weight/spectral norm), or that
    a backend named by the caller cannot run is left alone, and the log says why.

    convs=True also fuses lone conv units outside the blocks (conv + BN + ReLU, as
    torchvision's BasicConv2d and timm's ConvNormAct): a 1x1, a K x K at stride 1 with
    'same' padding or none, or a 3x3/2 unpadded (the stems of Inception-v3 and pytorch-fid's
    FID network, Conv2d_1a to Conv2d_4a). Each becomes a FusedBranchGraph of one branch,
    checked at swap time like a block; in fp32 on the CPU a stride-1 3x3 runs as Winograd's
    F(4x4, 3x3) (the stems' large grids) or F(2x2, 3x3). Lone units it cannot run (GoogLeNet's 7x7/2 with padding) are left alone
    quietly (logged at debug level): they are not Inception blocks.

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
    candidates = [(name, m, False) for name, m in model.named_modules() if _is_candidate(m)]
    if convs:
        candidates += [(name, m, True) for name, m in model.named_modules() if _is_lone_candidate(m)]
    replaced: list[str] = []
    units = 0  # lone conv units among `swapped`
    for name, module, lone in candidates:
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # inside a block that is already fused
        try:
            fused = _fuse_lone(module, backend) if lone else _fuse(module, backend)
            if not name:  # the model itself is a block: it cannot replace itself in place
                raise TypeError(f"model is itself {'a conv unit' if lone else 'an Inception block'}; use "
                                f"{type(fused).__name__}.from_module(model)")
            if (reason := _refusal(module)) is not None:
                raise NotAnInceptionBlock(reason, near_miss=True)
            param = next(module.parameters())
            try:  # a backend asked for by name that cannot run this block: refused, not raised mid-walk
                resolve_backend(backend, torch.empty(0, device=param.device, dtype=param.dtype))
            except (TypeError, ValueError, RuntimeError) as cannot:
                raise NotAnInceptionBlock(str(cannot), near_miss=True) from None
            rtol = min(SELF_CHECK_RTOL.get(param.dtype, 1e-4), verify or float("inf"))
            if param.is_meta:  # nothing to compute with: the traced structure is the proof
                log.debug("swap_inception: %s is on the meta device: not checked numerically", name)
            else:
                try:
                    mismatch = _self_check(module, fused, rtol, fallback=verify is None)  # NaN fails
                except (RuntimeError, ValueError, TypeError) as failed:  # not proven: left alone, never half-swapped
                    mismatch = f"the swap-time check could not run it ({type(failed).__name__}: {failed})"
                if mismatch is not None:
                    raise NotAnInceptionBlock(mismatch, near_miss=True)
        except NotAnInceptionBlock as reason:
            # A hook or parametrization also changes what tracing sees: say that, not its effect.
            if reason.near_miss and (refusal := _refusal(module)) is not None:
                reason = NotAnInceptionBlock(refusal, near_miss=True)
            if not name:  # the model itself: a network that does not parse as one block, no news
                log.debug("swap_inception: the model (%s) is not one Inception block: %s", type(module).__name__, reason)
            elif lone:
                log.debug("swap_inception: left the conv unit %s (%s) to eager: %s", name, type(module).__name__,
                          reason)
            elif reason.near_miss or all(hasattr(module, f"branch{i}") for i in range(1, 5)):
                skipped.append(name)
                log.warning("swap_inception: left %s (%s) unfused: %s", name, type(module).__name__, reason)
            else:
                log.debug("swap_inception: %s (%s) is not an Inception block: %s", name, type(module).__name__, reason)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fused)
        swapped.append(name)
        replaced.append(name)
        units += lone
    # In train mode with BN what a call runs depends on its batch and grid, which the count
    # above cannot tell (a newcomer read "swapped 9 block(s)" as every block fused in training).
    bn_train = [m for m in map(model.get_submodule, swapped) if isinstance(m, FusedBranchGraph) and m._bn_train]
    hint = (f"; in train mode with batch norm a CPU call runs fused from FusedBranchGraph.bn_train_min_pixels="
            f"{FusedBranchGraph.bn_train_min_pixels} input pixels (N*H*W), its original block below"
            if bn_train else "")
    if convs:
        log.info("swap_inception: swapped %d block(s) and %d conv unit(s), left %d unfused%s", len(swapped) - units,
                 units, len(skipped), hint)
    else:
        log.info("swap_inception: swapped %d block(s), left %d unfused%s", len(swapped), len(skipped), hint)
    placements = {(p.device.type, p.dtype) for name in swapped for p in model.get_submodule(name).parameters()}
    if (note := _precision_note(placements, backend)) is not None:
        log.warning("swap_inception: %s", note)
    return model


def _precision_note(placements: set[tuple[str, torch.dtype]], backend: str) -> str | None:
    """What a user of fp32 on a GPU should know once per swap, or None: under PyTorch's
    default flags the original convolutions run TF32 (torch.backends.cudnn.allow_tf32) and
    the fused kernels exact fp32 (they follow torch.backends.cuda.matmul.allow_tf32).
    Measured on an H200: inception_v3 at batch 32, 1.4e-4 off fp64 against 5.1e-4, and
    0.58x the speed."""
    if (("cuda", torch.float32) not in placements or backend not in ("auto", "triton") or not triton_available()
            or not torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return None
    return ("the fused blocks run exact fp32 on the GPU (torch.backends.cuda.matmul.allow_tf32 is False) where "
            "the original convolutions ran TF32 (torch.backends.cudnn.allow_tf32 is True): nearer fp64, and "
            "slower (0.58x on inception_v3 at batch 32 on an H200). For speed, run the model in bfloat16 "
            "(1.64x there), or set torch.backends.cuda.matmul.allow_tf32 = True for TF32 like the original "
            "(operands rounded as cuDNN rounds them; not yet measured on a GPU).")
