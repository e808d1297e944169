"""TALL masks and Consensus Merging (Wang, Dimitriadis, Ortiz-Jimenez, Fleuret and Frossard,
"Localizing Task Information for Improved Model Merging and Compression", ICML 2024, arXiv
2405.07813; authors' code ``nik-dim/tall_masks``, FusionBench 0.2.33 ``fusion_bench.method.tall_mask``).

With ``tau_t = theta_t - theta_0`` and the multi-task vector of task arithmetic
``tau_MTL = sum_t tau_t``, task ``t``'s TALL mask keeps the entries where ``tau_t`` weighs more
in ``tau_MTL`` than the other tasks' vectors do, by the factor ``lambda``:

    m_t = 1{ |tau_t| >= lambda |tau_MTL - tau_t| }                 (entry by entry)

* ``TallMasks``: one backbone per task, ``theta_t = theta_0 + m_t ⊙ tau_MTL`` (the paper's
  compression: the task id picks the backbone at inference). The authors choose ``lambda`` per
  task on validation data among 0.2, ..., 0.6; here it is one ``tall_mask_lambda`` for every task
  (as FusionBench's ``TallMaskTaskArithmeticAlgorithm``), which a comparison grid chooses.
* ``ConsensusTaskArithmetic``: one static backbone, task arithmetic on the entries at least ``k``
  tasks' masks keep (the consensus mask; the paper's ``k = 2`` drops the "selfish" weights that
  one task alone uses and the "catastrophic" ones none uses):

      theta = theta_0 + alpha * (1{ sum_t m_t >= k } ⊙ tau_MTL)

  ``k = 0`` is task arithmetic, ``k > T`` the pretrained model.

Every tensor of the backbone (matrices, convolutions, LayerNorms, biases, layer scales; BatchNorm's
running statistics) by the same rule, entry by entry: the engine merges it in cache-sized slices.

Numbers: ``tau_MTL`` is the float32 sum in pool order, as task arithmetic's; the mask compares
``|tau_t|`` with ``lambda |tau_MTL - tau_t|`` in float32. Where the paper and the code differ:
the paper's mask is ``>=``, the authors' code and FusionBench compare with ``>``; the two differ
only at ties (three equal task vectors at ``lambda = 0.5`` tie everywhere), and this module
follows the paper. FusionBench's ``TallMaskTaskArithmeticAlgorithm`` also compares
``|theta_0 - tau_t|`` (pretrained weights minus a task vector) where its own ``generate_task_masks``
of ``utils.py`` and the authors compare ``|theta_0 - theta_t| = |tau_t|``; this module follows the
paper and the authors (``benchmarks/fusionbench_masks.py`` measures both).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod, register_method
from merging.per_task import MaskedPart, PerTaskMethod


def tall_masks(task_vectors: Sequence[Tensor], multi_task: Tensor, tall_mask_lambda: float) -> Tensor:
    """``m_t = 1{|tau_t| >= lambda |tau_MTL - tau_t|}`` of every task, stacked: ``(T, *shape)`` booleans."""
    return torch.stack([tau.abs() >= (multi_task - tau).abs().mul_(tall_mask_lambda) for tau in task_vectors])


def _task_vectors_and_sum(task_vectors: Iterable[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The task vectors (copied: the stream may reuse one buffer) and ``tau_MTL``, their float32 sum in order."""
    vectors = [tau.to(torch.float32, copy=True) for tau in task_vectors]
    if not vectors:
        raise MergeError("nothing to merge: no fine-tuned model")
    total = vectors[0].clone()
    for tau in vectors[1:]:
        total.add_(tau)
    return vectors, total


def consensus_task_arithmetic(
    pretrained: Tensor, task_vectors: Iterable[Tensor], k: int, tall_mask_lambda: float, scaling_factor: float
) -> Tensor:
    """Consensus Merging with task arithmetic, one parameter tensor (see the module's docstring):
    ``theta_0 + alpha (1{sum_t m_t >= k} ⊙ tau_MTL)``."""
    vectors, multi_task = _task_vectors_and_sum(task_vectors)
    agreeing = tall_masks(vectors, multi_task, tall_mask_lambda).sum(0)
    return torch.where(agreeing >= k, multi_task, 0.0).mul_(scaling_factor).add_(pretrained)


def _check_lambda(tall_mask_lambda: float) -> None:
    if not (math.isfinite(tall_mask_lambda) and tall_mask_lambda >= 0):
        raise MergeError(f"tall_mask_lambda must be a finite number >= 0, got {tall_mask_lambda}")


@register_method
class ConsensusTaskArithmetic(MergeMethod):
    """Consensus Merging with task arithmetic (Wang et al., ICML 2024, arXiv 2405.07813): one static
    backbone, ``theta_0 + alpha (1{sum_t m_t >= k} ⊙ tau_MTL)``, task arithmetic on the entries that at
    least ``k`` tasks' TALL masks ``m_t = 1{|tau_t| >= lambda |tau_MTL - tau_t|}`` keep,
    ``tau_MTL = sum_t tau_t``; every tensor alike (``merging.tall_masks``). Data-free.

    Args:
        tall_mask_lambda: lambda of the TALL masks, >= 0 (the authors choose it per task among 0.2, ..., 0.6).
        k: the consensus: an entry is kept where at least k masks keep it (the paper's 2; 0 is task
            arithmetic, more than the number of tasks the pretrained model).
        scaling_factor: alpha, applied to the masked multi-task vector.
    """

    name = "consensus_task_arithmetic"
    elementwise = True
    propagates_non_finite = False  # comparisons: a NaN would be masked away, not shown

    def __init__(self, tall_mask_lambda: float, scaling_factor: float, k: int = 2) -> None:
        _check_lambda(tall_mask_lambda)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise MergeError(f"k must be an integer >= 0, got {k}")
        if not math.isfinite(scaling_factor):
            raise MergeError(f"scaling_factor must be a finite number, got {scaling_factor}")
        self.tall_mask_lambda = tall_mask_lambda
        self.k = k
        self.scaling_factor = scaling_factor

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"tall_mask_lambda": self.tall_mask_lambda, "k": self.k, "scaling_factor": self.scaling_factor}

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return consensus_task_arithmetic(pretrained, tensors, self.k, self.tall_mask_lambda, self.scaling_factor)


@register_method
class TallMasks(PerTaskMethod):
    """TALL masks (Wang et al., ICML 2024, arXiv 2405.07813): one backbone per task (the task id picks
    it at inference), ``theta_t = theta_0 + m_t ⊙ tau_MTL`` with ``tau_MTL = sum_t tau_t`` and the
    task's mask ``m_t = 1{|tau_t| >= lambda |tau_MTL - tau_t|}``; every tensor alike; held as the
    multi-task vector and one bit per weight and task (``merging.tall_masks``, ``merging.per_task``).
    Data-free.

    Args:
        tall_mask_lambda: lambda, >= 0, one for every task (the authors choose it per task among
            0.2, ..., 0.6 on validation data; FusionBench's default is 0.6).
    """

    name = "tall_masks"
    elementwise = True
    propagates_non_finite = False

    def __init__(self, tall_mask_lambda: float) -> None:
        _check_lambda(tall_mask_lambda)
        self.tall_mask_lambda = tall_mask_lambda

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"tall_mask_lambda": self.tall_mask_lambda}

    def merge_masked(self, pretrained: Tensor, task_vectors: Iterable[Tensor]) -> MaskedPart:
        vectors, multi_task = _task_vectors_and_sum(task_vectors)
        masks = tall_masks(vectors, multi_task, self.tall_mask_lambda)
        return MaskedPart(multi_task, masks, torch.zeros((len(vectors), 0), dtype=torch.float64))
