"""inception_fast: the Inception module of GoogLeNet as one fused kernel.

    import inception_fast as ifast
    fused = ifast.FusedInception.from_module(block)   # or ifast.swap_inception(model)
    report = ifast.profile(model, input_size=(1, 3, 224, 224))
"""

from . import counting_rules, models
from .blocks import NotAnInceptionBlock
from .fused import FusedInception
from .fused_graph import FusedBranchGraph
from .ops.backend import BACKENDS
from .ops.branch_graph import BranchGraphFunction
from .ops.inception import InceptionFunction, InceptionWeights, inception
from .profile import ModelDoesNotRun, ProfileReport, ProfileRow, profile
from .reference import ReferenceInception
from .spec import GOOGLENET_INCEPTION, Branch, BranchCounts, BranchGraphSpec, Conv, InceptionSpec, PaperBlock
from .swap import swap_inception
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "GOOGLENET_INCEPTION",
    "Branch",
    "BranchCounts",
    "BranchGraphFunction",
    "BranchGraphSpec",
    "Conv",
    "FusedBranchGraph",
    "FusedInception",
    "InceptionFunction",
    "InceptionSpec",
    "InceptionWeights",
    "ModelDoesNotRun",
    "NotAnInceptionBlock",
    "PaperBlock",
    "ProfileReport",
    "ProfileRow",
    "ReferenceInception",
    "VerifyReport",
    "counting_rules",
    "inception",
    "models",
    "profile",
    "swap_inception",
    "verify",
]
