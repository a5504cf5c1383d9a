"""FusedInception: GoogLeNet's Inception module on the fused op, as the branch graph's
preset (InceptionSpec.to_graph()): a thin layer over FusedBranchGraph.

It keeps the original block's children under their names, so parameters, buffers and
state_dict keys are exactly those of the block it replaces (a ReferenceInception,
torchvision's Inception, or a user's block of that shape). Only forward changes.
"""

from __future__ import annotations

from torch import nn

from .blocks import parse_traced_block
from .fused_graph import FusedBranchGraph
from .reference import ReferenceInception
from .spec import InceptionSpec

__all__ = ["FusedInception"]


class FusedInception(FusedBranchGraph):
    """Drop-in Inception module that runs as one fused op, forward and backward.

    Modes:
      * no batch norm, train or eval: fully fused, forward and backward;
      * batch norm, eval: BN folded into the convolutions, fully fused;
      * batch norm, train: the op's train-mode BN form (batch statistics between its
        stages, running stats updated as nn.BatchNorm2d does; FusedBranchGraph's
        bn_train_min_pixels and fuse_train_bn say where), else the original block.
    The backward recomputes the 3x3 and 5x5 reductions from x instead of saving them.
    x (N, in_channels, H, W) float; returns (N, out_channels, H, W) in the memory format
    eager convolution gives x (channels_last in, channels_last out: no transposes).
    """

    recompute_reductions = True

    def __init__(self, spec: InceptionSpec, batch_norm: bool = False, backend: str = "auto"):
        nn.Module.__init__(self)
        self._adopt(ReferenceInception(spec, batch_norm=batch_norm), backend)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedInception":
        """A fused module sharing (not copying) the parameters and buffers of `module`.

        Accepts any block whose torch.fx-traced forward computes the Inception module
        (ReferenceInception, torchvision's googlenet Inception, a user's block; blocks.py
        checks every op and argument). Raises TypeError for a non-module and
        NotAnInceptionBlock (a ValueError) saying why for anything else.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(module, backend)
        return fused.train(module.training)

    @classmethod
    def _from_traced(cls, module: nn.Module, traced, backend: str) -> "FusedInception":
        """from_module over trace_block(module), which the caller already has (swap_inception)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(module, backend, traced)
        return fused.train(module.training)

    def _adopt(self, block: nn.Module, backend: str, traced=None) -> None:
        spec, units, traced = parse_traced_block(block, traced)
        self._adopt_graph(block, spec.to_graph(), units, traced, backend)
        self.spec = spec
        self.batch_norm = units[0].bn is not None

    def extra_repr(self) -> str:
        mode = f"{self._train_mode_repr()}, " if self.batch_norm else ""
        return f"spec={self.spec}, backend={self.backend!r}, {mode}from={self.source}"
