"""Recognising Inception blocks and folding their weights for the fused op.

A block is accepted when its structure proves it computes the module of
DESIGN.md: four branches named branch1..branch4 (torchvision's names), each
convolution a unit with ``.conv`` (stride 1, 'same' padding, odd square
kernel), an optional ``.bn`` and a ReLU, and a 3x3/1/1 max pool in front of the
projection. Anything else is rejected with the reason, never half-accepted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .ops.inception import InceptionWeights
from .reference import ConvReLU, ReferenceInception
from .spec import InceptionSpec

__all__ = ["ConvUnit", "NotAnInceptionBlock", "parse_inception_block", "fold_conv_bn"]


class NotAnInceptionBlock(ValueError):
    """The module is not (provably) the Inception computation; the message says why."""


class ConvUnit(NamedTuple):
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None


def _relu_units() -> tuple[type, ...]:
    """Unit classes known to apply ReLU after conv(+bn) inside their forward."""
    units: list[type] = [ConvReLU]
    try:
        from torchvision.models.googlenet import BasicConv2d
    except ImportError:  # torchvision is optional for the library itself
        return tuple(units)
    return (*units, BasicConv2d)


def _inception_classes() -> tuple[type, ...]:
    """Block classes whose forward is known to be torch.cat([branch1..branch4], dim=1)."""
    classes: list[type] = [ReferenceInception]
    try:
        from torchvision.models.googlenet import Inception
    except ImportError:
        return tuple(classes)
    return (*classes, Inception)


def _parse_unit(unit: nn.Module, where: str, kernel: int | None) -> ConvUnit:
    if not isinstance(unit, _relu_units()):
        raise NotAnInceptionBlock(
            f"{where} is a {type(unit).__name__}, not a conv(+bn)+ReLU unit "
            f"({', '.join(c.__name__ for c in _relu_units())})"
        )
    conv, bn = unit.conv, getattr(unit, "bn", None)
    if not isinstance(conv, nn.Conv2d):
        raise NotAnInceptionBlock(f"{where}.conv is a {type(conv).__name__}, not nn.Conv2d")
    k = conv.kernel_size[0]
    problems = []
    if conv.kernel_size != (k, k) or k % 2 == 0:
        problems.append(f"kernel {conv.kernel_size} is not square and odd")
    if kernel is not None and k != kernel:
        problems.append(f"kernel {k}x{k} where {kernel}x{kernel} is required")
    if conv.stride != (1, 1):
        problems.append(f"stride {conv.stride} is not 1")
    if conv.dilation != (1, 1) or conv.groups != 1:
        problems.append("dilated or grouped")
    if conv.padding not in ((k // 2, k // 2), "same") or conv.padding_mode != "zeros":
        problems.append(f"padding {conv.padding} ({conv.padding_mode}) is not zero 'same' padding")
    if bn is not None:
        if not isinstance(bn, nn.BatchNorm2d):
            problems.append(f"bn is a {type(bn).__name__}, not nn.BatchNorm2d")
        elif not bn.track_running_stats:
            problems.append("bn has no running statistics to fold")
    if problems:
        raise NotAnInceptionBlock(f"{where}.conv: " + "; ".join(problems))
    return ConvUnit(conv, bn)


def parse_inception_block(block: nn.Module) -> tuple[InceptionSpec, tuple[ConvUnit, ...]]:
    """The spec and the six conv units [1x1, 3x3red, 3x3, 5x5red, 5x5, pool proj] of a block."""
    if not isinstance(block, _inception_classes()):
        raise NotAnInceptionBlock(
            f"{type(block).__name__} is not a known Inception block class "
            f"({', '.join(c.__name__ for c in _inception_classes())})"
        )
    b2, b3, b4 = block.branch2, block.branch3, block.branch4
    for name, seq in (("branch2", b2), ("branch3", b3), ("branch4", b4)):
        if not isinstance(seq, nn.Sequential) or len(seq) != 2:
            raise NotAnInceptionBlock(f"{name} is not a 2-stage nn.Sequential")
    pool = b4[0]
    if not (
        isinstance(pool, nn.MaxPool2d)
        and _pair(pool.kernel_size) == (3, 3)
        and _pair(pool.stride) == (1, 1)
        and _pair(pool.padding) == (1, 1)
        and _pair(pool.dilation) == (1, 1)
    ):
        raise NotAnInceptionBlock(f"branch4[0] is {pool}, not a 3x3 max pool, stride 1, padding 1")
    units = (
        _parse_unit(block.branch1, "branch1", kernel=1),
        _parse_unit(b2[0], "branch2[0]", kernel=1),
        _parse_unit(b2[1], "branch2[1]", kernel=None),
        _parse_unit(b3[0], "branch3[0]", kernel=1),
        _parse_unit(b3[1], "branch3[1]", kernel=None),
        _parse_unit(b4[1], "branch4[1]", kernel=1),
    )
    c = [u.conv for u in units]
    cin = c[0].in_channels
    for where, conv, expected_in in (
        ("branch2[0]", c[1], cin),
        ("branch2[1]", c[2], c[1].out_channels),
        ("branch3[0]", c[3], cin),
        ("branch3[1]", c[4], c[3].out_channels),
        ("branch4[1]", c[5], cin),
    ):
        if conv.in_channels != expected_in:
            raise NotAnInceptionBlock(
                f"{where}.conv takes {conv.in_channels} channels, its input has {expected_in}"
            )
    if len({u.bn is None for u in units}) != 1:
        raise NotAnInceptionBlock("some convolutions have batch norm and others do not")
    spec = InceptionSpec(
        in_channels=cin,
        ch1x1=c[0].out_channels,
        ch3x3red=c[1].out_channels,
        ch3x3=c[2].out_channels,
        ch5x5red=c[3].out_channels,
        ch5x5=c[4].out_channels,
        pool_proj=c[5].out_channels,
        k3=c[2].kernel_size[0],
        k5=c[4].kernel_size[0],
    )
    return spec, units


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def fold_conv_bn(unit: ConvUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by eval-mode BN: w*g/sqrt(var+eps), (b-mu)*g/sqrt(var+eps)+beta.

    Differentiable: under autograd the folded tensors stay connected to the parameters.
    """
    conv, bn = unit
    bias = conv.bias
    if bias is None:
        bias = torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
    if bn is None:
        return conv.weight, bias
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift


def fold_units(units: tuple[ConvUnit, ...]) -> InceptionWeights:
    return InceptionWeights(*(t for unit in units for t in fold_conv_bn(unit)))
