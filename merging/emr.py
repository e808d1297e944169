"""EMR-Merging (Huang, Ye, Chen, Ouyang, Wu and Yang, "EMR-Merging: Tuning-Free High-Performance
Model Merging", NeurIPS 2024, arXiv 2405.17461; authors' code ``harveyhuang18/EMR_Merging``,
FusionBench 0.2.33 ``fusion_bench.method.emr_merging``): Elect a unified task vector, then Mask and
Rescale it for each task, one backbone per task (the task id picks it at inference).

With ``tau_t = theta_t - theta_0``, entry by entry for every parameter tensor:

    gamma   = sgn(sum_t tau_t)                                   (the elected sign)
    tau_uni = gamma * max_t |tau_t| over the tasks with sgn(tau_t) = gamma
    M_t     = 1{ tau_t ⊙ tau_uni > 0 }                           (task t agrees with the election)

and over the whole backbone, one rescaler per task that gives the masked vector the task
vector's mean magnitude:

    lambda_t = sum |tau_t| / sum |M_t ⊙ tau_uni|                  (sums over every backbone entry)
    theta_t  = theta_0 + lambda_t * (M_t ⊙ tau_uni)

No hyper-parameter ("tuning-free"). Held as ``tau_uni``, one bit per weight and task and the
``lambda_t`` (``merging.per_task``); every tensor alike, BatchNorm's running statistics included.

Where the paper and the code differ, this module follows the paper:

* the rescaler: the paper's sums run over the whole model (the ratio of the two mean magnitudes
  over all weights, as the authors' code on flattened vectors, ``main_emr_30_vits.py``, computes
  it); their per-tensor code (``main_emr_merging.py``), which FusionBench copies, sums each
  tensor's *mean* instead, which weighs a 64-entry bias as much as a 4-million-entry matrix;
* a sum of exactly 0: ``sgn(0) = 0`` elects no sign, so ``tau_uni`` and every mask are 0 there;
  the code's ``(sum > 0) * 2 - 1`` elects the negative sign, which differs only where some task
  vectors are non-zero and sum to exactly 0.

A task whose mask keeps nothing (it disagrees with every election) has ``M_t ⊙ tau_uni = 0``: its
backbone is ``theta_0`` whatever ``lambda_t``, which is then 0 (the paper's ratio has no value).

Numbers: the elected sign comes from the float32 sum in pool order (as FusionBench's and the
authors'), so ``tau_uni`` and the masks are theirs to the bit; the rescaler's sums are float64.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import register_method
from merging.per_task import MaskedPart, PerTaskMethod


def emr_elect(task_vectors: Iterable[Tensor]) -> MaskedPart:
    """EMR's election and masks of one tensor (see the module's docstring): ``tau_uni``, the masks
    ``M_t`` and, per task, ``sum |tau_t|`` and ``sum |M_t ⊙ tau_uni|`` over the tensor (float64)."""
    vectors = [tau.to(torch.float32, copy=True) for tau in task_vectors]  # the stream may reuse one buffer
    if not vectors:
        raise MergeError("nothing to merge: no fine-tuned model")
    total = vectors[0].clone()
    for tau in vectors[1:]:
        total.add_(tau)
    elected = torch.sign(total)
    masks = torch.stack([(tau * elected) > 0 for tau in vectors])
    magnitude = torch.zeros_like(total)
    for tau, mask in zip(vectors, masks):
        magnitude = torch.maximum(magnitude, torch.where(mask, tau.abs(), 0.0))
    unified = elected.mul_(magnitude)
    unified_magnitude = unified.abs().to(torch.float64)
    sums = torch.stack([
        torch.stack([tau.abs().sum(dtype=torch.float64), torch.where(mask, unified_magnitude, 0.0).sum()])
        for tau, mask in zip(vectors, masks)
    ])  # fmt: skip
    return MaskedPart(unified, masks, sums)


def emr_rescalers(sums: Tensor) -> list[float]:
    """``lambda_t = sum |tau_t| / sum |M_t ⊙ tau_uni|`` from the whole backbone's sums (``(T, 2)``);
    0 where the masked vector is 0 (the backbone is then ``theta_0`` whatever ``lambda_t``)."""
    return [float(magnitude / masked) if masked > 0 else 0.0 for magnitude, masked in sums.tolist()]


@register_method
class EMRMerging(PerTaskMethod):
    """EMR-Merging (Huang et al., NeurIPS 2024, arXiv 2405.17461): one backbone per task (the task id
    picks it at inference), ``theta_t = theta_0 + lambda_t (M_t ⊙ tau_uni)``: the unified task vector
    ``tau_uni`` (entry by entry the elected sign ``sgn(sum_t tau_t)`` times the largest magnitude among the
    tasks of that sign), task ``t``'s mask ``M_t = 1{tau_t ⊙ tau_uni > 0}`` and rescaler
    ``lambda_t = sum |tau_t| / sum |M_t ⊙ tau_uni|`` (sums over the whole backbone); every tensor alike
    (``merging.emr``). No hyper-parameter; data-free."""

    name = "emr_merging"
    elementwise = True
    propagates_non_finite = False  # comparisons and a max: check every input

    def merge_masked(self, pretrained: Tensor, task_vectors: Iterable[Tensor]) -> MaskedPart:
        return emr_elect(task_vectors)

    def task_scales(self, sums: Tensor) -> list[float]:
        return emr_rescalers(sums)
