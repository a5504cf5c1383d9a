"""FusedInception: the nn.Module face of ops/inception.py.

It keeps the original block's children under their names, so parameters,
buffers and state_dict keys are exactly those of the block it replaces (a
ReferenceInception, torchvision's Inception, or a user's block of that
shape). Only forward changes: the branches' weights (BN folded in eval mode)
go to the one fused op.
"""

from __future__ import annotations

import torch
from torch import nn

from ._cache import TensorVersionCache
from ._checks import check_choice, check_input
from .blocks import fold_units, inception_classes, parse_inception_block, parse_traced_block
from .ops.inception import BACKENDS, InceptionWeights, fused_forward
from .reference import ReferenceInception
from .spec import InceptionSpec

__all__ = ["FusedInception"]


class FusedInception(nn.Module):
    """Drop-in Inception module that runs as one fused op.

    Modes:
      * no batch norm, train or eval: fully fused, forward and backward;
      * batch norm, eval: BN folded into the convolutions, fully fused;
      * batch norm, train: BN needs the batch statistics of each convolution's
        output, which a folded kernel cannot produce. The branches run unfused,
        exactly as the original block (running stats update the same way).
    """

    def __init__(self, spec: InceptionSpec, batch_norm: bool = False, backend: str = "auto"):
        super().__init__()
        template = ReferenceInception(spec, batch_norm=batch_norm)
        self._adopt(template, backend)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedInception":
        """A fused module sharing (not copying) the parameters and buffers of `module`.

        Accepts ReferenceInception, torchvision's googlenet Inception block, and any
        block whose traced forward has the Inception structure (blocks.py). Raises
        NotAnInceptionBlock (a ValueError) saying why for anything else.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(module, backend)
        fused.train(module.training)
        return fused

    def _adopt(self, block: nn.Module, backend: str) -> None:
        if isinstance(block, inception_classes()):
            (spec, units), traced = parse_inception_block(block), None
        else:
            spec, units, traced = parse_traced_block(block)
        self.spec = spec
        self.backend = check_choice("backend", backend, BACKENDS)
        self.batch_norm = units[0].bn is not None
        self.source = type(block).__name__
        # The block's own children under their own names: state_dict keys do not change.
        for name, child in block.named_children():
            setattr(self, name, child)
        self._units = units  # a plain tuple: not registered twice as submodules
        # A traced block's forward (sharing its submodules), for train mode with BN; set
        # around nn.Module.__setattr__ so that it is not registered as a submodule.
        object.__setattr__(self, "_traced", traced)
        self._fold_cache: TensorVersionCache[InceptionWeights] = TensorVersionCache()
        self._pack_cache: TensorVersionCache = TensorVersionCache()

    def _weights(self) -> InceptionWeights:
        if not self.batch_norm:
            return fold_units(self._units)  # no fold: the parameters themselves
        sources = [t for unit in self._units for m in unit for t in m.parameters()]
        sources += [s for unit in self._units for s in (unit.bn.running_mean, unit.bn.running_var)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return fold_units(self._units)  # keep the fold in the autograd graph
        with torch.no_grad():
            return self._fold_cache.get(sources, lambda: fold_units(self._units))

    def invalidate_weight_caches(self) -> None:
        """Forget folded and packed weights. Only needed after writes through `param.data`,
        which bypass the version counter that the caches watch."""
        self._fold_cache.clear()
        self._pack_cache.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spec.in_channels)
        if self.batch_norm and self.training:
            if self._traced is not None:
                out = self._traced(x)
            else:
                branches = (self.branch1, self.branch2, self.branch3, self.branch4)
                out = torch.cat([branch(x) for branch in branches], dim=1)
            return out.contiguous(memory_format=torch.channels_last)
        return fused_forward(x, self._weights(), self.backend, self._pack_cache, spec=self.spec)

    def extra_repr(self) -> str:
        mode = "unfused in train mode (batch norm), " if self.batch_norm else ""
        return f"spec={self.spec}, backend={self.backend!r}, {mode}from={self.source}"

