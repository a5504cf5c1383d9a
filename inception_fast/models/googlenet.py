"""GoogLeNet exactly as "Going Deeper with Convolutions" (Table 1) describes it.

Unlike torchvision's googlenet: no batch norm, local response normalisation
after the first two conv stages, and real 5x5 convolutions in the Inception
blocks. Top-level children are named after the paper's rows so that the
profiler's rows line up with Table 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import ReferenceInception
from ..spec import GOOGLENET_INCEPTION

__all__ = ["GoogLeNetOutputs", "AuxiliaryHead", "GoogLeNetPaper", "googlenet_paper", "googlenet_loss"]

#: Weight of each auxiliary classifier's loss in training (paper, section 5).
AUX_LOSS_WEIGHT = 0.3


class GoogLeNetOutputs(NamedTuple):
    logits: torch.Tensor
    aux1: torch.Tensor
    aux2: torch.Tensor


def _conv_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2), nn.ReLU(inplace=True)
    )


def _max_pool() -> nn.MaxPool2d:
    # ceil_mode=True gives the paper's grid sizes: 112 -> 56 -> 28 -> 14 -> 7.
    return nn.MaxPool2d(3, stride=2, ceil_mode=True)


def _lrn() -> nn.LocalResponseNorm:
    # Caffe's GoogLeNet settings; PyTorch, like Caffe, divides alpha by the window size.
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


class AuxiliaryHead(nn.Module):
    """avg pool 5x5/3 -> 1x1 conv 128 + ReLU -> fc 1024 + ReLU -> dropout 70% -> fc."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.avgpool = nn.AvgPool2d(5, stride=3)
        self.conv = _conv_relu(in_channels, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Adaptive pooling would hide a wrong input size; the paper's head expects 14x14 -> 4x4.
        x = self.conv(self.avgpool(x))
        x = self.dropout(self.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


class GoogLeNetPaper(nn.Module):
    def __init__(self, num_classes: int = 1000, aux_logits: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.aux_logits = bool(aux_logits)
        self.conv1 = _conv_relu(3, 64, 7, stride=2)
        self.maxpool1 = _max_pool()
        self.lrn1 = _lrn()
        self.conv2_reduce = _conv_relu(64, 64, 1)
        self.conv2 = _conv_relu(64, 192, 3)
        self.lrn2 = _lrn()
        self.maxpool2 = _max_pool()
        blocks = {name: ReferenceInception(b.spec) for name, b in GOOGLENET_INCEPTION.items()}
        self.inception3a, self.inception3b = blocks["3a"], blocks["3b"]
        self.maxpool3 = _max_pool()
        self.inception4a, self.inception4b = blocks["4a"], blocks["4b"]
        self.inception4c, self.inception4d = blocks["4c"], blocks["4d"]
        self.inception4e = blocks["4e"]
        self.maxpool4 = _max_pool()
        self.inception5a, self.inception5b = blocks["5a"], blocks["5b"]
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # 7x7 on a 224x224 input, as in the paper
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(1024, num_classes)
        if self.aux_logits:
            self.aux1 = AuxiliaryHead(GOOGLENET_INCEPTION["4a"].spec.out_channels, num_classes)
            self.aux2 = AuxiliaryHead(GOOGLENET_INCEPTION["4d"].spec.out_channels, num_classes)
        else:
            self.aux1 = self.aux2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (N, 3, H, W), got {tuple(x.shape)}")
        x = self.lrn1(self.maxpool1(self.conv1(x)))
        x = self.maxpool2(self.lrn2(self.conv2(self.conv2_reduce(x))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux_logits and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux_logits and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if aux1 is not None:
            return GoogLeNetOutputs(logits, aux1, aux2)
        return logits


def googlenet_paper(num_classes: int = 1000, aux_logits: bool = True) -> GoogLeNetPaper:
    """GoogLeNet as in the paper, randomly initialised (no pretrained weights ship)."""
    return GoogLeNetPaper(num_classes=num_classes, aux_logits=aux_logits)


def googlenet_loss(
    outputs: torch.Tensor | GoogLeNetOutputs, target: torch.Tensor, aux_weight: float = AUX_LOSS_WEIGHT
) -> torch.Tensor:
    """Cross entropy of the main head plus `aux_weight` times each auxiliary head's."""
    if isinstance(outputs, GoogLeNetOutputs):
        main = F.cross_entropy(outputs.logits, target)
        return main + aux_weight * (
            F.cross_entropy(outputs.aux1, target) + F.cross_entropy(outputs.aux2, target)
        )
    return F.cross_entropy(outputs, target)
