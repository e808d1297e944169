"""Model pool, merge methods and the switched heads.

from merging import ModelPool, TiesMerging, merge_backbone
pool = ModelPool({"_pretrained_": "facebook/convnext-base-224", "dtd": "path/to/dtd-model"})  # or any one family
merged = merge_backbone(pool, TiesMerging(top_k=0.2, scaling_factor=0.3))
"""

from common.errors import CheckpointError
from merging.cart import CART
from merging.coefficients import Coefficients, LearnedCoefficients
from merging.emr import EMRMerging
from merging.engine import merge_backbone, merge_per_task
from merging.errors import MergeError
from merging.fisher_merging import FisherMerging
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
from merging.per_task import PerTaskMerge, PerTaskMethod
from merging.pool import ModelPool
from merging.regmean import RegMean
from merging.regmean_plusplus import RegMeanPlusPlus
from merging.spectral import IsotropicCommon, IsotropicCommonTask, TaskSingularVectors
from merging.switch import SwitchModule
from merging.tall_masks import ConsensusTaskArithmetic, TallMasks
from merging.wudi import WUDIMerging

__all__ = [
    "CART",
    "CheckpointError",
    "DareTaskArithmetic",
    "DareTies",
    "FisherMerging",
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
    "RegMeanPlusPlus",
    "SimpleAverage",
    "SwitchModule",
    "TaskArithmetic",
    "TaskSingularVectors",
    "TiesMerging",
    "WUDIMerging",
    "merge_backbone",
    "merge_function",
    "register_method",
    "ConsensusTaskArithmetic",
    "EMRMerging",
    "PerTaskMerge",
    "PerTaskMethod",
    "TallMasks",
    "merge_per_task",
]
