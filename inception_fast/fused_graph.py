"""FusedBranchGraph: the nn.Module face of the fused op (ops/branch_graph.py), and the
recognition of torchvision's Inception-v3 blocks InceptionA to E (any other branch-graph
block is read by the general parser, graph_parse.py). A thin module: parse, fold BN, pack
(cached), call the op. FusedInception (fused.py) is its GoogLeNet preset.

It keeps the original block's children under their own names (state_dict unchanged). In
eval mode it folds each BN into its convolution and runs the fused kernel, and with
autograd on the fused backward too (gradients reach the convs and BNs through the
folding). In train mode with BN it runs the op's train-mode BN form
(ops/branch_graph_bn_train.py: batch statistics between the stages, running statistics
updated as nn.BatchNorm2d does), or the original block where that form does not apply.
"""

from __future__ import annotations

import copy
import hashlib
import threading

import torch
from torch import nn

from ._cache import TensorVersionCache, tracing
from ._checks import check_choice, check_input, check_same_dtype_device
from ._dropin import DropInBlock, autocast_dtype, autocast_off, log, match_memory_format, uses_batch_statistics
from .blocks import ConvUnit, NotAnInceptionBlock, fold_conv_bn
from .graph_parse import parse_branch_graph
from .ops.backend import BACKENDS, cacheable, resolve_backend
from .ops.branch_graph import apply_graph, graph_forward_inference, pack_weights, residual_tail, winograd_tiles
from .ops.branch_graph_bn_train import BatchNormTrain, apply_graph_bn_train, check_batch_size
from .ops.plan import plan, plan_with_residual
from .spec import Branch, BranchGraphSpec, Conv

__all__ = ["FusedBranchGraph", "torchvision_graph_layout"]


# Every (flat plan, backward plan) of the process by its id, which a module holds: a hash of
# the plan's content, so that an id means the same plan in every process (a compiled
# graph's guard on the id, replayed from a cache in another process, finds that plan).
_PLAN_TABLE: dict[int, tuple[list[int], list[int]]] = {}
_PLAN_LOCK = threading.Lock()  # modules built or unpickled in threads


def _plan_id(flat_plan: list[int], backward_plan: list[int]) -> int:
    plans = (list(flat_plan), list(backward_plan))
    digest = hashlib.blake2b(repr(plans).encode(), digest_size=8).digest()
    plan_id = int.from_bytes(digest, "little") >> 2  # 62 bits: an int64 constant to dynamo
    with _PLAN_LOCK:
        known = _PLAN_TABLE.setdefault(plan_id, plans)
    if known != plans:  # a 64-bit hash collision: never run one plan for the other
        raise RuntimeError(f"plan id {plan_id} names two plans; please report this")
    return plan_id


@torch.compiler.assume_constant_result
def _plans_by_id(plan_id: int) -> tuple[list[int], list[int]]:
    return _PLAN_TABLE[plan_id]


def _plans(module) -> tuple[list[int], list[int]]:
    """The module's (flat plan, backward plan), fixed at construction. A constant to dynamo:
    read as attributes, each of their ~70 ints became a guard, evaluated on every call of a
    compiled model (~130 us per call on googlenet). Looked up by an int id, one guard: an
    assume_constant_result over the module itself fails to trace on torch 2.11
    ("UnspecializedNNModuleVariable is not a constant")."""
    return _plans_by_id(module._plan_id)

# Branches as chains of torchvision attribute names (a tuple inside a chain is a fan-out),
# then the pooling branch's kind and its 1x1 (torchvision calls F.avg_pool2d(x, 3, 1, 1)).
_TORCHVISION_LAYOUTS = {
    "InceptionA": ((("branch1x1",), ("branch5x5_1", "branch5x5_2"),
                    ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")), "avg", "branch_pool"),
    "InceptionC": ((("branch1x1",), ("branch7x7_1", "branch7x7_2", "branch7x7_3"),
                    ("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5")),
                   "avg", "branch_pool"),
    "InceptionE": ((("branch1x1",), ("branch3x3_1", ("branch3x3_2a", "branch3x3_2b")),
                    ("branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b"))), "avg", "branch_pool"),
    # Grid reductions: branches end in 3x3 stride-2 convolutions; F.max_pool2d(x, 3, stride=2).
    "InceptionB": ((("branch3x3",), ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")), "max", None),
    "InceptionD": ((("branch3x3_1", "branch3x3_2"),
                    ("branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4")), "max", None),
}


# torchvision's constructor arguments of each block, read off a module of that layout.
_CONSTRUCTOR_ARGS = {
    "InceptionA": lambda m: (m.branch1x1.conv.in_channels, m.branch_pool.conv.out_channels),
    "InceptionB": lambda m: (m.branch3x3.conv.in_channels,),
    "InceptionC": lambda m: (m.branch1x1.conv.in_channels, m.branch7x7_1.conv.out_channels),
    "InceptionD": lambda m: (m.branch3x3_1.conv.in_channels,),
    "InceptionE": lambda m: (m.branch1x1.conv.in_channels,),
}


def _layout_names(chains, pool_attr) -> list[str]:
    names = [a for chain in chains for step in chain for a in (step if isinstance(step, tuple) else (step,))]
    return names + ([pool_attr] if pool_attr else [])


def _pool_variants(pristine, pool: str) -> list[tuple[str, bool, list]]:
    """(pool, count_include_pad, graph signature) of a pristine stride-1 torchvision block and
    of its pool-branch variants that the fused op also runs: the 3x3/1 average pool without
    count_include_pad (pytorch-fid's FIDInceptionA, C, E_1) and a 3x3/1 max pool
    (FIDInceptionE_2). Only the pool node's call changes; every other node must match."""
    import torch.fx as fx
    import torch.nn.functional as F

    from .blocks import graph_signature

    variants = [(pool, True, graph_signature(pristine))]
    pools = [n for n in pristine.graph.nodes if n.op == "call_function" and n.target is F.avg_pool2d]
    if len(pools) != 1:  # a grid reduction: its max pool has no variants
        return variants
    for pool, include_pad in (("avg", False), ("max", True)):
        variant = fx.GraphModule(pristine, copy.deepcopy(pristine.graph))
        node = next(n for n in variant.graph.nodes if n.op == "call_function" and n.target is F.avg_pool2d)
        if pool == "max":  # as fx records F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            node.target = F.max_pool2d
            node.args = (node.args[0], 3)
            node.kwargs = dict(stride=1, padding=1, dilation=1, ceil_mode=False, return_indices=False)
        else:
            node.kwargs = {**node.kwargs, "count_include_pad": False}
        variants.append((pool, include_pad, graph_signature(variant)))
    return variants


def torchvision_graph_layout(module: nn.Module):
    """(layout, traced graph) of a block that computes exactly what torchvision's InceptionA-E
    of its shape computes, or one of its pool-branch variants (_pool_variants); None when its
    children are not such a block's; NotAnInceptionBlock (near miss) when they are but its
    forward computes something else. layout = (chains, pool, pool attribute, count_include_pad).

    Recognition is by computation, not class: the block's torch.fx graph (traced through
    BasicConv2d or any wrapper) must equal, node for node with every argument, the graph
    of a pristine torchvision block built with the same constructor arguments (on the meta
    device). A subclass with another activation, an extra op or other pool arguments fails.
    """
    try:
        import torch.fx as fx
        from torchvision.models import inception as tv

        from .blocks import graph_signature, trace_block
    except ImportError:
        return None
    children = dict(module.named_children())
    for name, layout in _TORCHVISION_LAYOUTS.items():
        chains, pristine_pool, pool_attr = layout
        if set(children) != set(_layout_names(chains, pool_attr)):
            continue
        try:
            args = _CONSTRUCTOR_ARGS[name](module)
            with torch.device("meta"):
                pristine = getattr(tv, name)(*args)
        except Exception:  # children without torchvision's attributes: not this layout
            return None
        traced = trace_block(module)
        got = graph_signature(traced, root=module)
        variants = _pool_variants(fx.symbolic_trace(pristine), pristine_pool)
        for pool, include_pad, want in variants:
            if got == want:
                return (chains, pool, pool_attr, include_pad), traced
        want = variants[0][2]
        nodes = list(traced.graph.nodes)
        at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        what = nodes[at].format_node() if at < len(nodes) else "the end of the graph"
        raise NotAnInceptionBlock(f"{type(module).__name__} has torchvision {name}'s children but computes "
                                  f"something else: its traced graph differs at {what}", near_miss=True)
    return None


def _unit(block: nn.Module, attr: str) -> tuple[ConvUnit, Conv]:
    """BasicConv2d (conv without bias, BN, ReLU) -> its folding unit and its Conv shape."""
    basic = getattr(block, attr)
    conv, bn = getattr(basic, "conv", None), getattr(basic, "bn", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise NotAnInceptionBlock(f"{attr} is not a conv + BN unit")
    kh, kw = conv.kernel_size
    stride = conv.stride[0]
    problems = []
    if kh % 2 == 0 or kw % 2 == 0:
        problems.append(f"kernel {conv.kernel_size} is not odd")
    if conv.stride not in ((1, 1), (2, 2)) or conv.dilation != (1, 1) or conv.groups != 1:
        problems.append(f"stride {conv.stride}, dilated or grouped")
    want = (kh // 2, kw // 2) if stride == 1 else (0, 0)
    if conv.padding != want or conv.padding_mode != "zeros":
        problems.append(f"padding {conv.padding} is not {want} (zero 'same' padding, or none at stride 2)")
    if not bn.track_running_stats:
        problems.append("bn has no running statistics to fold")
    if problems:
        raise NotAnInceptionBlock(f"{attr}: " + "; ".join(problems))
    return ConvUnit(conv, bn), Conv(conv.in_channels, conv.out_channels, kh, kw, stride)


def _parse(block: nn.Module, found=None):
    """(spec, units, traced graph) of a block that computes torchvision's InceptionA-E (or a
    pool variant), else of any block the general parser reads (graph_parse.py); `found` is
    torchvision_graph_layout(block), when the caller already has it. A block with torchvision's
    children that computes something else goes to the general parser too; when that fails as
    well, its reason is given if it is a near miss, torchvision's comparison's otherwise. A
    lone conv unit (a stem's BasicConv2d) reads as a graph of one branch of one level."""
    if found is None:
        try:
            found = torchvision_graph_layout(block)
        except NotAnInceptionBlock as torchvision_reason:
            try:
                return parse_branch_graph(block, lone=True)
            except NotAnInceptionBlock as reason:
                raise (reason if reason.near_miss else torchvision_reason) from None
        if found is None:
            return parse_branch_graph(block, lone=True)
    (chains, pool, pool_attr, include_pad), traced = found
    units, branches = [], []
    for chain in chains:
        levels = []
        for step in chain:
            parsed = [_unit(block, a) for a in (step if isinstance(step, tuple) else (step,))]
            units += [u for u, _ in parsed]
            levels.append(tuple(c for _, c in parsed))
        branches.append(Branch(tuple(levels)))
    pool_conv = None
    if pool_attr is not None:
        pool_unit, pool_conv = _unit(block, pool_attr)
        units.append(pool_unit)
    in_channels = branches[0].levels[0][0].in_channels
    try:
        spec = BranchGraphSpec(in_channels, tuple(branches), pool, pool_conv, stride=1 if pool_attr else 2,
                               count_include_pad=include_pad)
    except ValueError as exc:
        raise NotAnInceptionBlock(str(exc)) from None
    return spec, units, traced


class _NonFiniteWeights(Exception):
    """Raised by FusedBranchGraph._packed's build: a folded weight or bias is not finite."""


class FusedBranchGraph(DropInBlock):
    """A block on the fused branch-graph op (ops/branch_graph.py: C++ on CPUs, Triton on GPUs),
    forward and backward: Inception-v3's InceptionA to E as built here, any block the
    general parser reads (graph_parse.py: timm's Inception-v4 blocks, a user's own), a lone
    conv unit (a stem's BasicConv2d or ConvNormAct, as one branch of one convolution), and
    (FusedInception) GoogLeNet's module. Calls the fused kernel cannot honour run the original block
    (_dropin.py): FX tracing, ONNX export, torch.func, hooks, autocast to a dtype no kernel
    takes, backend "reference" (the original is the reference), and train-mode BN where
    the train-mode BN form does not apply (_bn_train_backend).

    x (N, C, H, W) float; the output has the memory format eager convolution gives x.
    `recompute_reductions`: the backward recomputes the intermediates made by 1x1s over x
    (one GEMM) instead of saving them; False saves them (faster backward, more memory).
    """

    recompute_reductions = False
    # Train mode with BN: the fused train-mode BN form runs from this many input pixels
    # (N x H x W) on; below, the original block (the same batch statistics and updates).
    # Training repacks the weights every step, and on small grids that and the statistics
    # passes cost about what the kernel saves. Train forward + backward against eager
    # channels_last, 2 Zen 5 threads, with the Winograd weight gradients and the one-pass
    # packer: GoogLeNet's 4a-4e at batch 8 (1,568 pixels) 0.98-0.99x, at 12 (2,352)
    # 1.03-1.06x, at 16 (3,136) 1.05-1.11x; 5a and 5b at batch 32 (1,568) 0.96-0.99x;
    # Inception-v3's 17x17 blocks at batch 8 (2,312) 1.02-1.04x (7a 0.98-1.00x) since the
    # kernel writes the backward's contiguous interiors itself, and a whole Inception-v3 step
    # at batch 8 2-2.5% faster with them fused than with 2,400 here. 0 fuses every call: the
    # form saves ~45% of the bytes eager keeps for the backward.
    bn_train_min_pixels = 2300
    # False: train mode with BN always runs the original block (second-order gradients, or
    # bitwise eager results); per class or per block.
    fuse_train_bn = True

    def __init__(self, block: nn.Module, backend: str = "auto", *, _layout=None, _parsed=None):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be a torch.nn.Module, got {type(block).__name__}")
        # _layout: torchvision_graph_layout(block); _parsed: parse_branch_graph(block); either
        # when the caller already has it (swap_inception), so that the block is traced once.
        spec, units, traced = _parsed if _parsed is not None else _parse(block, _layout)
        self._adopt_graph(block, spec, units, traced, backend)
        self.spec = spec

    @classmethod
    def from_module(cls, block: nn.Module, backend: str = "auto") -> "FusedBranchGraph":
        return cls(block, backend).train(block.training)

    def _adopt_graph(self, block: nn.Module, graph: BranchGraphSpec, units, traced, backend: str) -> None:
        self.backend = check_choice("backend", backend, BACKENDS)
        self.graph = graph
        self.source = type(block).__name__
        self._adopt_original(block, traced)
        self._adopt_units(units)
        self._plan = plan(graph)
        self._plan_id = _plan_id(self._plan.flat(), self._plan.backward_flat())
        reductions = self._plan.reductions() if self.recompute_reductions else {}
        self._recompute = tuple(reductions.get(k, -1) for k in range(len(self._plan.buf_channels)))
        self._pack_caches: dict[tuple[str, torch.dtype | None, bool, tuple | None], TensorVersionCache] = {}
        self._winograd_flags: dict[tuple[bool, int, int], tuple] = {}
        self._op_convs = len(self._plan.convs)  # the fused op's; a residual tail's 1x1 comes after them
        self._adopt_residual_plan()
        self._bn_train = self._bn_train_form()

    def _bn_train_form(self) -> bool:
        """Whether the train-mode BN form can run this block: every convolution of the op
        followed by a BatchNorm2d, and no residual tail. The swap has already checked what
        each BN computes in train mode: a torchvision layout's are plain nn.BatchNorm2d leaves
        (exact type), and the general parser traced the block in train and eval mode and
        read a norm traced through (timm's BatchNormAct2d) as BatchNorm2d's own F.batch_norm
        call, momentum, training flag and num_batches_tracked increment included, then its
        ReLU (blocks.trace_block). A BN subclass that computes anything else is refused
        there."""
        return self.graph.residual is None and all(isinstance(u.bn, nn.BatchNorm2d) for u in self._units)

    def _adopt_residual_plan(self) -> None:
        # Inference runs the tail as the kernel's last GEMM (plan_with_residual); its flat
        # list is a plain attribute, used only outside tracing, where _plans' constant lookup
        # is not needed.
        self._residual_plan = None if self.graph.residual is None else plan_with_residual(self.graph)
        self._residual_flat = None if self._residual_plan is None else self._residual_plan.flat()

    def _folded(self, dtype: torch.dtype | None) -> tuple[list, list]:
        """Folded (weights, biases) in plan order, cast to autocast's dtype when one is given;
        differentiable (autograd reaches the convolutions' and BNs' parameters)."""
        folded = [fold_conv_bn(u) for u in self._units]
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        return [cast(w) for w, _ in folded], [cast(b) for _, b in folded]

    def _winograd(self, residual: bool, h: int, w: int) -> tuple:
        """pack_weights's Winograd flags for an h x w input (winograd_tiles: a 3x3's tile
        follows its grid), memoised per grid."""
        key = (residual, h, w)
        flags = self._winograd_flags.get(key)
        if flags is None:
            flags = self._winograd_flags[key] = winograd_tiles(self._residual_plan if residual else self._plan, h, w)
        return flags

    def _packed(self, backend: str, dtype: torch.dtype | None = None, residual: bool = False,
                grid: tuple[int, int] = (0, 0)) -> tuple[list, list]:
        """The kernel layout of the folded weights: cached per (backend, dtype, Winograd tiles)
        while no parameter or BN statistic changes, packed in the graph when traced. With
        `residual`, for plan_with_residual: the tail's 1x1 too, its weight and bias times its
        scale. grid: x's (H, W), which picks the 3x3s' Winograd tiles on the CPU (a model run
        at one resolution packs once)."""
        # The tiles matter to fp32 packings only (fp16 packs fp32; bf16 and fp64 run direct).
        weight_dtype = dtype if dtype is not None else self._units[0].conv.weight.dtype
        fp32 = weight_dtype in (torch.float32, torch.float16)
        flags = self._winograd(residual, *grid) if backend == "cpu" and fp32 else None

        def build():
            weights, biases = self._folded(dtype)
            if not residual:
                return pack_weights(self._plan, weights[:self._op_convs], biases[:self._op_convs], backend, flags)
            scale = self.graph.residual.scale
            n = self._op_convs
            return pack_weights(self._residual_plan, [*weights[:n], weights[n] * scale],
                                [*biases[:n], biases[n] * scale], backend, flags)

        # num_batches_tracked: BN's kernel updates the running stats in place without bumping
        # their version counter, but bumps this one on every train-mode forward.
        # The modules' own dicts, not parameters()/buffers(): those generators cost ~20 us per
        # call on a GoogLeNet block, as much as the kernel at batch 1 on a 7x7 grid.
        sources = [t for u in self._units for m in u if m is not None
                   for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
        if not cacheable(sources[0]):
            return build()

        def build_checked():
            # Once per change of the weights (meta, fake and traced tensors are not cached,
            # and not checked): a NaN or inf among them runs the original (forward).
            if not all(bool(torch.isfinite(t).all()) for t in sources if t.is_floating_point() and not t.is_meta):
                raise _NonFiniteWeights
            return build()

        cache = self._pack_caches.setdefault((backend, dtype, residual, flags), TensorVersionCache())
        with torch.no_grad():  # a cached value must never hold on to an autograd graph
            return cache.get(sources, build_checked, extra=tuple(bn.eps for bn in self._bns))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward(x)
        except _NonFiniteWeights:
            # A NaN or inf among the folded weights (a corrupted model): the kernels multiply
            # their zero borders (0 * NaN), where eager's padded convolutions skip the
            # padding taps and keep the border finite, so the original runs instead. Packing
            # checks once per change of the weights; under tracing it does not (no packing
            # cache there), and the fused ops run.
            if not getattr(self, "_warned_non_finite", False):
                self._warned_non_finite = True
                log.warning("%s: non-finite folded weights; running the original block", self.source)
            return self._run_original(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.graph.in_channels)
        reason = self._unfused_reason(x)
        if reason == "batch statistics" and (train_backend := self._bn_train_backend(x)) is not None:
            return self._forward_bn_train(x, train_backend)
        run = self._kernel_input(x) if reason is None else None
        backend = None if run is None else resolve_backend(self.backend, run[0])
        if backend not in ("cpu", "triton"):
            if reason == "batch statistics":
                # The original updates BN's running statistics in place, and the version
                # counters the packed-weight cache watches move only through
                # num_batches_tracked, which a BN may lack.
                self.invalidate_weight_caches()
            return self._run_original(x)
        if self.graph.stride == 2 and not torch.jit.is_tracing() and min(x.shape[2], x.shape[3]) < 3:
            raise ValueError(f"x must be at least 3x3 for {self.source}'s 3x3 stride-2 grid reduction, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        x_run, dtype = run
        if dtype is None:
            check_same_dtype_device(x, {"the block's convolution weights": self._units[0].conv.weight})
        with autocast_off(x, dtype):
            n = self._op_convs
            if tracing() or (torch.is_grad_enabled() and (x_run.requires_grad or any(
                    p.requires_grad for p in self.parameters()))):
                weights, biases = self._folded(dtype)
                packed = (pack_weights(self._plan, weights[:n], biases[:n], backend,
                                       winograd_tiles(self._plan, *x.shape[2:]) if backend == "cpu" else None)
                          if tracing() else self._packed(backend, dtype, grid=tuple(x.shape[2:])))
                flat_plan, backward_plan = _plans(self)
                y = apply_graph(x_run, backend, flat_plan, backward_plan, self._recompute, weights[:n],
                                biases[:n], packed)
                tail = (weights[n], biases[n]) if len(weights) > n else None
            elif self._residual_flat is not None and dtype is None:
                # Inference of a residual block: the tail is the kernel's last GEMM (C++ or
                # Triton), with x added in its epilogue. Not under autocast, where eager adds
                # the tail to x in x's own (wider) dtype.
                packed = self._packed(backend, None, True, tuple(x.shape[2:]))
                y = graph_forward_inference(x_run, *packed, self._residual_flat, backend)
                return match_memory_format(x, y)
            else:  # inference on cached packed weights: no fold, no autograd
                packed = self._packed(backend, dtype, grid=tuple(x.shape[2:]))
                y = graph_forward_inference(x_run, *packed, _plans(self)[0], backend)
                tail = None
            if self.graph.residual is not None:
                # The tail's 1x1 has no BN (the parser checks): its own weight and bias.
                w, b = tail if tail is not None else (self._units[n].conv.weight, self._units[n].conv.bias)
                if dtype is not None:
                    w, b = w.to(dtype), (None if b is None else b.to(dtype))
                # x itself, not its autocast copy: eager adds the bf16 tail to x as it is,
                # which promotes (autocast's bf16 + float32 x gives float32).
                y = residual_tail(x, y, w, b, self.graph.residual.scale, self.graph.residual.relu)
            elif dtype is not None and self.graph.stride == 2 and self.graph.pool is not None:
                # Eager's grid reduction concatenates the max pool of x as it is with the
                # convolutions' autocast outputs, and torch.cat promotes. The kernel pooled
                # x's autocast copy: where x is wider, its pool channels are taken from x
                # itself (exact values, and a backward that picks x's own maxima, not ties
                # that rounding made).
                wide = torch.promote_types(dtype, x.dtype)
                if wide != dtype:
                    c0, c1 = self._plan.pool_copy_channel, self._plan.pool_copy_channel + x.shape[1]
                    y = y.to(wide)
                    y = torch.cat([y[:, :c0], torch.nn.functional.max_pool2d(x, 3, 2), y[:, c1:]], 1)
        return match_memory_format(x, y)

    def _bn_train_backend(self, x: torch.Tensor) -> str | None:
        """The backend ("cpu" or "triton") on which this call, with a BN on batch statistics,
        takes the op's train-mode BN form (ops/branch_graph_bn_train.py), or None: every
        convolution followed by a BatchNorm2d, every one on batch statistics (a mix of
        folded and batch statistics runs the original), float32 or float64 on the C++
        kernel (from bn_train_min_pixels input pixels on) or float32 on Triton, no
        autocast, a non-empty batch, fuse_train_bn set; not traced, but under torch.compile
        on the C++ kernel (as custom ops: ops/branch_graph_bn_train.py's graph_bn_train)."""
        compiling = torch.compiler.is_compiling() and not torch.compiler.is_exporting()
        if not (self._bn_train and self.fuse_train_bn) or (tracing() and not compiling) \
                or x.dtype not in (torch.float32, torch.float64):
            return None
        if x.numel() == 0:  # an empty batch: the original's (no statistics, stats untouched)
            return None
        # Every BN on batch statistics, with BN's own forward (not one set on the instance).
        if not all(uses_batch_statistics(bn) and "forward" not in bn.__dict__ for bn in self._bns):
            return None
        if autocast_dtype(x) is not None or self._units[0].conv.weight.dtype != x.dtype:
            return None
        try:
            backend = resolve_backend(self.backend, x)
        except (TypeError, ValueError, RuntimeError):  # a backend that cannot run x: the original decides
            return None
        if compiling and backend != "cpu":
            return None
        if backend == "cpu":  # the threshold was measured on the CPU kernel
            fused = x.device.type == "cpu" and x.shape[0] * x.shape[2] * x.shape[3] >= self.bn_train_min_pixels
        else:
            fused = backend == "triton" and x.dtype == torch.float32
        return backend if fused else None

    def _forward_bn_train(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """The block in train mode with batch norm, on the fused op's train-mode BN form: the
        running statistics and num_batches_tracked change as nn.BatchNorm2d's forward
        changes them (torch/nn/modules/batchnorm.py, _BatchNorm.forward). A batch of one
        value per channel raises first, with nothing updated."""
        check_batch_size(self._plan, x)
        bns = []
        for bn in self._bns:
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None and torch.compiler.is_compiling():  # a tensor: float() breaks the graph
                    factor = torch.reciprocal(bn.num_batches_tracked.double())
                elif bn.momentum is None:
                    factor = 1.0 / float(bn.num_batches_tracked)
            # _BatchNorm.forward's choice: running statistics are passed to F.batch_norm, and so
            # updated, in training only with track_running_stats (set False after construction,
            # the buffers remain and stay untouched).
            update = (bn.training and bn.track_running_stats and bn.running_mean is not None
                      and bn.running_var is not None)
            bns.append(BatchNormTrain(bn.weight, bn.bias, bn.eps,
                                      (bn.running_mean, bn.running_var, factor) if update else None))
        y = apply_graph_bn_train(x, self._plan, _plans(self)[1], [u.conv.weight for u in self._units],
                                 [u.conv.bias for u in self._units], bns, backend)
        return match_memory_format(x, y, saved=False)

    def __setstate__(self, state: dict) -> None:
        # Unpickled (torch.load of a whole model, deepcopy, a spawned worker): this process's
        # table may not hold the plan yet.
        super().__setstate__(state)
        self._plan_id = _plan_id(self._plan.flat(), self._plan.backward_flat())
        if "_residual_plan" not in state:  # pickled before the residual epilogue existed
            self._adopt_residual_plan()
        if "_winograd_flags" not in state:  # pickled before the 3x3s' tile followed the grid
            self._winograd_flags = {}
        if "_bn_train" not in state:  # pickled before the train-mode BN form
            self._bn_train = self._bn_train_form()

    @property
    def _flat_plan(self) -> list[int]:
        return list(_PLAN_TABLE[self._plan_id][0])  # a copy: the table's list is shared by every such block

    @property
    def _backward_plan(self) -> list[int]:
        return list(_PLAN_TABLE[self._plan_id][1])

    def invalidate_weight_caches(self) -> None:
        """Forget the packed weights. Only needed after writes through `param.data`, which
        bypass the version counter that the cache watches."""
        self._pack_caches.clear()

    def extra_repr(self) -> str:
        pool = f"{self.graph.pool} pool" if self.graph.pool else "no pool"
        tail = ("" if self.graph.residual is None else
                f" + residual 1x1 (scale {self.graph.residual.scale:g}{', ReLU' if self.graph.residual.relu else ''})")
        return (f"{self.source}: {len(self.graph.branches)} branches + {pool}{tail}, "
                f"in_channels={self.graph.in_channels}, out_channels={self.graph.out_channels}, "
                f"backend={self.backend!r}" + (f", {self._train_mode_repr()}" if self._bns else ""))

    def _train_mode_repr(self) -> str:
        """What train mode runs, for extra_repr."""
        if not (self._bn_train and self.fuse_train_bn):
            return "train mode with batch norm: the original block"
        cpu = (f"on CPU tensors the C++ kernel from bn_train_min_pixels={self.bn_train_min_pixels} input pixels "
               "N*H*W, the original below")
        where = {"cpu": cpu, "triton": "Triton"}.get(self.backend, f"{cpu}; Triton on CUDA tensors")
        return f"train mode with batch norm: fused ({where})"
