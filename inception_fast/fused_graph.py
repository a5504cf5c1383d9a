"""FusedBranchGraph: torchvision's Inception-v3 blocks InceptionA to E on the fused
branch-graph kernels (ops/branch_graph.py: C++ on CPUs, Triton on GPUs).
A thin module: parse, fold BN, pack, call the op.

It keeps the original block's children under their own names (state_dict unchanged). In
eval mode it folds each BN into its convolution and runs the fused kernel, and with
autograd on the fused backward too (gradients reach the convs and BNs through the
folding); in train mode it runs the original block (BN needs batch statistics, and
running stats update exactly as before).
"""

from __future__ import annotations

import torch
from torch import nn

from ._cache import TensorVersionCache
from ._checks import check_choice, check_input, check_same_dtype_device
from .blocks import ConvUnit, NotAnInceptionBlock, fold_conv_bn
from .ops.branch_graph import (
    Branch,
    BranchGraphFunction,
    BranchGraphSpec,
    Conv,
    graph_forward,
    graph_triton_forward,
    pack_graph_weights,
    plan,
)
from .ops.inception import _cacheable, resolve_backend

__all__ = ["FusedBranchGraph", "torchvision_graph_layout"]

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


def torchvision_graph_layout(module: nn.Module):
    """The layout of a torchvision InceptionA-E whose forward is torchvision's own, else None."""
    try:
        from torchvision.models import inception as tv
    except ImportError:
        return None
    for name, layout in _TORCHVISION_LAYOUTS.items():
        cls = getattr(tv, name)
        if isinstance(module, cls) and type(module).forward is cls.forward and type(module)._forward is cls._forward:
            return layout
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


def _parse(block: nn.Module) -> tuple[BranchGraphSpec, list[ConvUnit]]:
    layout = torchvision_graph_layout(block)
    if layout is None:
        raise NotAnInceptionBlock(f"{type(block).__name__} is not torchvision's InceptionA, B, C, D or E")
    chains, pool, pool_attr = layout
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
        spec = BranchGraphSpec(in_channels, tuple(branches), pool, pool_conv, stride=1 if pool_attr else 2)
    except ValueError as exc:
        raise NotAnInceptionBlock(str(exc)) from None
    return spec, units


class FusedBranchGraph(nn.Module):
    """A torchvision Inception-v3 block (InceptionA to E) on the fused branch-graph kernel."""

    def __init__(self, block: nn.Module, backend: str = "auto"):
        super().__init__()
        check_choice("backend", backend, ("auto", "triton", "cpu", "reference"))
        self.spec, units = _parse(block)
        self.backend = backend
        self.source = type(block).__name__
        for name, child in block.named_children():
            self.add_module(name, child)  # same objects, same names: same state_dict
        self._original = (block,)  # a tuple: not registered twice; it shares the children
        self._units = units
        self._plan = plan(self.spec)
        self._flat_plan = self._plan.flat()
        self._backward_plan = self._plan.backward_flat()
        self._pack_caches: dict[str, TensorVersionCache] = {"cpu": TensorVersionCache(), "triton": TensorVersionCache()}

    @classmethod
    def from_module(cls, block: nn.Module, backend: str = "auto") -> "FusedBranchGraph":
        return cls(block, backend).train(block.training)

    def _packed(self, backend: str):
        def build():
            folded = [fold_conv_bn(u) for u in self._units]
            weights, biases = [w for w, _ in folded], [b for _, b in folded]
            if backend == "triton":
                from .ops.branch_graph_triton import pack_graph_weights_triton

                return pack_graph_weights_triton(self._plan, weights, biases)
            return pack_graph_weights(self.spec, self._plan, weights, biases)

        sources = [t for u in self._units for t in (u.conv.weight, u.bn.weight, u.bn.bias, u.bn.running_mean,
                                                    u.bn.running_var) if t is not None]
        if not _cacheable(self._pack_caches[backend], sources[0]):
            return build()  # traced (compile, export): folding and packing go into the graph
        with torch.no_grad():
            return self._pack_caches[backend].get(sources, build)

    def _fused_backend(self, x: torch.Tensor) -> str | None:
        """The kernel that runs x in eval mode ("cpu" or "triton"), or None for the original
        branches; the same rules as FusedInception's backend="auto"."""
        if self.training:
            return None
        backend = resolve_backend(self.backend, x)
        return backend if backend in ("cpu", "triton") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spec.in_channels)
        if self.spec.stride == 2 and min(x.shape[2], x.shape[3]) < 3:
            raise ValueError(f"x must be at least 3x3 for {self.source}'s 3x3 stride-2 grid reduction, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        backend = self._fused_backend(x)
        if backend is None:
            return self._original[0](x)
        params = dict(self.named_parameters())
        check_same_dtype_device(x, params)
        b, bias = self._packed(backend)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params.values())):
            # Autograd through the folding (differentiable, elementwise) gives the gradients
            # of the convolutions' and BNs' parameters from those of the folded weights.
            folded = [fold_conv_bn(u) for u in self._units]
            weights, biases = [w for w, _ in folded], [bi for _, bi in folded]
            return BranchGraphFunction.apply(x, backend, self._flat_plan, self._backward_plan, b, bias, *weights,
                                             *biases)
        op = graph_triton_forward if backend == "triton" else graph_forward
        return op(x, b, bias, self._flat_plan)

    def invalidate_weight_caches(self) -> None:
        """After writing weights through `.data` (which skips the version counter)."""
        for cache in self._pack_caches.values():
            cache.clear()

    def extra_repr(self) -> str:
        return (f"{self.source}: {len(self.spec.branches)} branches + {self.spec.pool} pool, "
                f"in_channels={self.spec.in_channels}, out_channels={self.spec.out_channels}, "
                f"backend={self.backend!r}, unfused in train mode (batch norm)")
