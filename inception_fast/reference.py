"""The one reference Inception module. Tests and benchmarks import it from here.

It is deliberately plain PyTorch: four branches of nn.Conv2d (+ BatchNorm) +
ReLU and a torch.cat. Its submodule names mirror torchvision's GoogLeNet
``Inception`` block, so with ``batch_norm=True`` the two share state_dict keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_input
from .spec import InceptionSpec

__all__ = ["ConvReLU", "ReferenceInception", "BN_EPS"]

#: torchvision's BasicConv2d uses this epsilon; so do we, so that folded weights match.
BN_EPS = 1e-3


class ConvReLU(nn.Module):
    """conv -> (BatchNorm) -> ReLU, named like torchvision's BasicConv2d (conv, bn)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not batch_norm
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS) if batch_norm else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.relu(x)


class ReferenceInception(nn.Module):
    """The Inception module of GoogLeNet in plain PyTorch.

    Output channel order is [1x1 | 3x3 | 5x5 | pool proj], as in torchvision.
    """

    def __init__(self, spec: InceptionSpec, batch_norm: bool = False):
        super().__init__()
        if not isinstance(spec, InceptionSpec):
            raise TypeError(f"spec must be an InceptionSpec, got {type(spec).__name__}")
        self.spec = spec
        self.batch_norm = bool(batch_norm)
        s, bn = spec, self.batch_norm
        self.branch1 = ConvReLU(s.in_channels, s.ch1x1, 1, bn)
        self.branch2 = nn.Sequential(
            ConvReLU(s.in_channels, s.ch3x3red, 1, bn), ConvReLU(s.ch3x3red, s.ch3x3, s.k3, bn)
        )
        self.branch3 = nn.Sequential(
            ConvReLU(s.in_channels, s.ch5x5red, 1, bn), ConvReLU(s.ch5x5red, s.ch5x5, s.k5, bn)
        )
        # ceil_mode=True is torchvision's; at stride 1 it changes nothing.
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            ConvReLU(s.in_channels, s.pool_proj, 1, bn),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles no Python argument checks
            check_input(x, self.spec.in_channels)
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, batch_norm={self.batch_norm}"
