"""Model pool, merge methods and the switched heads.

from merging import ModelPool, TiesMerging, merge_backbone
pool = ModelPool({"_pretrained_": "facebook/convnext-base-224", "dtd": "path/to/dtd-model"})  # or any one family
merged = merge_backbone(pool, TiesMerging(top_k=0.2, scaling_factor=0.3))
"""

from common.errors import CheckpointError
from merging.cart import CART
from merging.coefficients import Coefficients, LearnedCoefficients
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.magmax import MagMax
from merging.methods import (
    METHODS,
    DareTaskArithmetic,
    DareTies,
    MergeMethod,
    SimpleAverage,
    TaskArithmetic,
    TiesMerging,
    merge_function,
    register_method,
)
from merging.model_stock import ModelStock
from merging.pcb import PCBMerging
from merging.pool import ModelPool
from merging.regmean import RegMean
from merging.spectral import IsotropicCommon, IsotropicCommonTask, TaskSingularVectors
from merging.switch import SwitchModule
from merging.wudi import WUDIMerging

__all__ = [
    "CART",
    "CheckpointError",
    "DareTaskArithmetic",
    "DareTies",
    "IsotropicCommon",
    "IsotropicCommonTask",
    "Coefficients",
    "LearnedCoefficients",
    "MagMax",
    "METHODS",
    "MergeError",
    "MergeMethod",
    "ModelPool",
    "ModelStock",
    "PCBMerging",
    "RegMean",
    "SimpleAverage",
    "SwitchModule",
    "TaskArithmetic",
    "TaskSingularVectors",
    "TiesMerging",
    "WUDIMerging",
    "merge_backbone",
    "merge_function",
    "register_method",
]
