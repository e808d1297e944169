"""Fisher merging (Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
arXiv 2111.09832): every parameter the average of the fine-tuned models' weighted, entry by
entry, by each model's diagonal Fisher information on its own task.

With ``F_t`` task ``t``'s diagonal Fisher (``merging.fisher``: squared per-image gradients of
``sum_c sqrt(p_c) log p_c`` over ``N`` unlabelled train images of the task), entry by entry

    theta = sum_t c_t (F_t + e) theta_t / sum_t c_t (F_t + e)

as FusionBench 0.2.33 computes it (``merging_with_fisher_weights``):

- ``e`` (``minimal_fisher_weight``, FusionBench's default 1e-6) is added to every Fisher entry,
  so an entry that no task's Fisher weighs (zero in every ``F_t``, a parameter the forward never
  reads) is the ``c``-weighted average instead of ``0 / 0``;
- ``c_t`` with ``normalize_fisher_weight`` (FusionBench's default): ``1 / (||F_t|| + e)``
  normalised to sum to 1, ``||F_t||`` the L2 norm of task ``t``'s whole Fisher (every backbone
  parameter's entries), so that a task whose Fisher is larger overall does not weigh more for
  it; without it every ``c_t`` is the same. (FusionBench's algorithm also multiplies every
  ``c_t`` by ``1/T``, which cancels in the ratio, and exposes no per-model coefficients.)

The norms and the ratio are computed in float64 on the Fishers' device (FusionBench in the
models' float32); results are float32.

What has no Fisher: the backbone's buffers get no gradient, so a ResNet's BatchNorm running
means and variances are the simple average of the fine-tuned ones (FusionBench computes a
Fisher for every state-dict entry and fails on them: a buffer has no ``.grad``), and its integer
``num_batches_tracked`` is the pretrained model's, as under every method. Only the backbone is
merged; each task keeps its own fine-tuned head, which the Fisher pass uses for ``p`` (FusionBench's
ConvNeXt pools would have it merged too, were the heads of one shape).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod, register_method, simple_average


def fisher_coefficients(fishers: Mapping[str, Sequence[Tensor]], normalize: bool, minimal_fisher_weight: float) -> list[float]:
    """``c_t``: ``1 / (||F_t|| + e)`` over the sum of those (the norm over every key's entries),
    or ``1 / T`` each without ``normalize``."""
    counts = {len(per_task) for per_task in fishers.values()}
    if len(counts) != 1:
        raise MergeError(f"Fisher merging: the keys have Fishers of different numbers of tasks: {sorted(counts)}")
    (count,) = counts
    if not normalize:
        return [1.0 / count] * count
    squares = [0.0] * count
    for per_task in fishers.values():
        for index, fisher in enumerate(per_task):
            squares[index] += float(torch.linalg.vector_norm(fisher.to(torch.float64)) ** 2)
    inverses = [1.0 / (math.sqrt(square) + minimal_fisher_weight) for square in squares]
    return [inverse / sum(inverses) for inverse in inverses]


def fisher_merge(
    tensors: Iterable[Tensor], fishers: Sequence[Tensor], coefficients: Sequence[float], minimal_fisher_weight: float
) -> Tensor:
    """``sum_t c_t (F_t + e) theta_t / sum_t c_t (F_t + e)`` of one parameter, in float64 on the
    Fishers' device, as float32.

    Args:
        tensors: ``theta_t`` of each task, in the order of ``fishers`` (a stream: each is copied to
            the Fishers' device as it arrives).
        fishers: ``F_t`` of each task, of the parameter's shape.
        coefficients: ``c_t`` (``fisher_coefficients``).
        minimal_fisher_weight: ``e``.

    Raises ``MergeError`` on a count or shape mismatch.
    """
    if not fishers or len(coefficients) != len(fishers):
        raise MergeError(f"Fisher merging: {len(fishers)} Fishers for {len(coefficients)} coefficients")
    numerator: Tensor | None = None
    denominator: Tensor | None = None
    count = 0
    for tensor in tensors:
        if count == len(fishers):
            raise MergeError(f"Fisher merging: more tensors than the {len(fishers)} Fishers")
        fisher = fishers[count]
        if fisher.shape != tensor.shape:
            raise MergeError(f"Fisher merging: a tensor of shape {list(tensor.shape)} has a Fisher of shape {list(fisher.shape)}")
        weight = (fisher.to(torch.float64) + minimal_fisher_weight).mul_(coefficients[count])
        weighted = weight * tensor.to(device=fisher.device, dtype=torch.float64)
        numerator = weighted if numerator is None else numerator.add_(weighted)
        denominator = weight if denominator is None else denominator.add_(weight)
        count += 1
    if count != len(fishers):
        raise MergeError(f"Fisher merging: {count} tensors for {len(fishers)} Fishers")
    return numerator.div_(denominator).to(torch.float32)


@register_method
class FisherMerging(MergeMethod):
    """Fisher merging (Matena and Raffel, NeurIPS 2022, arXiv 2111.09832): every backbone parameter
    the average of the fine-tuned ones weighted entry by entry by each model's diagonal Fisher on
    its own task's unlabelled train images, ``sum_t c_t (F_t + e) theta_t / sum_t c_t (F_t + e)``;
    buffers (a ResNet's BatchNorm statistics) the simple average (see ``merging.fisher_merging``).
    Needs the Fisher pass: set ``data.gram_images``.

    Args:
        normalize_fisher_weight: weigh each model by ``c_t = 1 / (||F_t|| + e)`` (normalised to
            sum to 1), the L2 norm of its whole Fisher; False: every ``c_t`` the same (FusionBench's
            name and default, True).
        minimal_fisher_weight: ``e``, added to every Fisher entry so that one no task weighs is an
            average, not ``0 / 0`` (FusionBench's name and default, 1e-6); positive.
    """

    name = "fisher_merging"
    uses_pretrained = False
    propagates_non_finite = False  # a ratio: check every input, not only the output
    needs_fisher = True

    def __init__(self, normalize_fisher_weight: bool = True, minimal_fisher_weight: float = 1e-6) -> None:
        if not (math.isfinite(minimal_fisher_weight) and minimal_fisher_weight > 0):
            raise MergeError(f"minimal_fisher_weight must be a positive finite number, got {minimal_fisher_weight}")
        self.normalize_fisher_weight = normalize_fisher_weight
        self.minimal_fisher_weight = minimal_fisher_weight

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"normalize_fisher_weight": self.normalize_fisher_weight, "minimal_fisher_weight": self.minimal_fisher_weight}

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return simple_average(tensors)

    def fisher_coefficients(self, fishers: Mapping[str, Sequence[Tensor]]) -> list[float]:
        return fisher_coefficients(fishers, self.normalize_fisher_weight, self.minimal_fisher_weight)

    def merge_fisher(self, tensors: Iterable[Tensor], fishers: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
        return fisher_merge(tensors, fishers, coefficients, self.minimal_fisher_weight)
