"""Model definitions: GoogLeNet as the paper describes it."""

from .googlenet import AUX_LOSS_WEIGHT, AuxiliaryHead, GoogLeNetOutputs, GoogLeNetPaper, googlenet_loss, googlenet_paper

__all__ = ["AUX_LOSS_WEIGHT", "AuxiliaryHead", "GoogLeNetOutputs", "GoogLeNetPaper", "googlenet_loss", "googlenet_paper"]
