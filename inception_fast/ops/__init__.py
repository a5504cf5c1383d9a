"""Fused ops. One file per op: its kernels' host wrappers, dispatch and autograd.Function."""

from .inception import BACKENDS, InceptionFunction, InceptionWeights, inception

__all__ = ["BACKENDS", "InceptionFunction", "InceptionWeights", "inception"]
