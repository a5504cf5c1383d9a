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

from ._cache import TensorVersionCache, tracing
from ._checks import check_choice, check_input, check_same_dtype_device
from ._dropin import DropInBlock, autocast_off, match_memory_format
from .blocks import fold_units, parse_traced_block
from .ops.inception import BACKENDS, InceptionWeights, fused_forward
from .reference import ReferenceInception
from .spec import InceptionSpec

__all__ = ["FusedInception"]


class FusedInception(DropInBlock):
    """Drop-in Inception module that runs as one fused op.

    Modes:
      * no batch norm, train or eval: fully fused, forward and backward;
      * batch norm, eval: BN folded into the convolutions, fully fused;
      * batch norm, train: BN needs the batch statistics of each convolution's
        output, which a folded kernel cannot produce. The original block runs
        (running stats update the same way).
    Calls that the fused kernel cannot honour (FX tracing, ONNX export, torch.func,
    inner hooks, autocast on the C++ kernel) run the original block too; see _dropin.py.

    The output has the memory format eager convolution would give: channels_last for a
    channels_last input (the fast path: no transposes), contiguous NCHW otherwise.
    """

    def __init__(self, spec: InceptionSpec, batch_norm: bool = False, backend: str = "auto"):
        super().__init__()
        template = ReferenceInception(spec, batch_norm=batch_norm)
        self._adopt(template, backend)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedInception":
        """A fused module sharing (not copying) the parameters and buffers of `module`.

        Accepts any block whose torch.fx-traced forward computes the Inception module
        (ReferenceInception, torchvision's googlenet Inception, a user's block; blocks.py
        checks every op and argument). Raises NotAnInceptionBlock (a ValueError) saying
        why for anything else.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(module, backend)
        fused.train(module.training)
        return fused

    def _adopt(self, block: nn.Module, backend: str) -> None:
        spec, units, traced = parse_traced_block(block)
        self.spec = spec
        self.backend = check_choice("backend", backend, BACKENDS)
        self.batch_norm = units[0].bn is not None
        self.source = type(block).__name__
        self._adopt_original(block, traced)
        self._adopt_units(units)
        self._fold_cache: TensorVersionCache[InceptionWeights] = TensorVersionCache()
        self._pack_cache: TensorVersionCache = TensorVersionCache()
        self._cast_caches: dict[torch.dtype, TensorVersionCache[InceptionWeights]] = {}

    def _weights(self) -> InceptionWeights:
        if not self.batch_norm:
            return fold_units(self._units)  # no fold: the parameters themselves
        sources = [t for unit in self._units for m in unit for t in m.parameters()]
        # BN's kernel updates running stats in place without bumping their version counter;
        # num_batches_tracked is bumped (add_) on every train-mode forward, so it keys them.
        sources += [s for unit in self._units
                    for s in (unit.bn.running_mean, unit.bn.running_var, unit.bn.num_batches_tracked)]
        if tracing() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return fold_units(self._units)  # in the autograd graph, or in the traced graph
        with torch.no_grad():
            eps = tuple(bn.eps for bn in self._bns)  # a float attribute: no version counter
            return self._fold_cache.get(sources, lambda: fold_units(self._units), extra=eps)

    def _cast(self, weights: InceptionWeights, dtype: torch.dtype) -> InceptionWeights:
        """weights in autocast's dtype: differentiable under autograd, cached (per dtype) otherwise."""
        cast = lambda: InceptionWeights(*(t.to(dtype) for t in weights))  # noqa: E731
        if tracing() or (torch.is_grad_enabled() and any(t.requires_grad for t in weights)):
            return cast()
        with torch.no_grad():
            return self._cast_caches.setdefault(dtype, TensorVersionCache()).get(list(weights), cast)

    def invalidate_weight_caches(self) -> None:
        """Forget folded and packed weights. Only needed after writes through `param.data`,
        which bypass the version counter that the caches watch."""
        self._fold_cache.clear()
        self._pack_cache.clear()
        self._cast_caches.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spec.in_channels)
        run = self._kernel_input(x) if self._unfused_reason(x) is None else None
        if run is None:
            return self._run_original(x)
        x_run, dtype = run
        if dtype is None:
            check_same_dtype_device(x, {"the block's parameters": self._units[0].conv.weight})
            weights = self._weights()
        else:  # autocast on the Triton kernels: fp16/bf16 in, fp32 accumulation
            weights = self._cast(self._weights(), dtype)
        with autocast_off(x, dtype):
            y = fused_forward(x_run, weights, self.backend, self._pack_cache, spec=self.spec)
        return match_memory_format(x, y)

    def extra_repr(self) -> str:
        mode = "original block in train mode (batch norm), " if self.batch_norm else ""
        return f"spec={self.spec}, backend={self.backend!r}, {mode}from={self.source}"
