"""The fused op, bottom-up: backend.py (backend choice, weight layouts, NHWC views) <- plan.py
(the GEMM schedule of a spec) <- branch_graph.py (packing, custom ops, backward,
autograd.Function; Triton kernels in branch_graph_triton.py) <- inception.py (GoogLeNet's
module as the graph's preset)."""

from .backend import BACKENDS
from .branch_graph import BranchGraphFunction
from .inception import InceptionFunction, InceptionWeights, inception

__all__ = ["BACKENDS", "BranchGraphFunction", "InceptionFunction", "InceptionWeights", "inception"]
