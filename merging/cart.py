"""CART, centered arithmetic with rank reduction (Choi et al., "Revisiting Weight Averaging for
Model Merging", arXiv 2412.12153; authors' code ``JH-GEECS/CART``, not in FusionBench 0.2.33):
task vectors taken around the average of the fine-tuned models instead of the pretrained one,
each cut to its top singular components, added back to the average.

For a weight matrix (a 2-D tensor), with ``tau_t = theta_t - theta_0``, the average
``theta_avg = theta_0 + (1/T) sum_t tau_t``, the centered task vectors
``c_t = theta_t - theta_avg`` and ``SVD_k(c)`` the sum of ``c``'s top ``k`` singular triplets,
``k = max(1, int(rank_ratio * r))`` (``r = min(rows, columns)``; none at ``rank_ratio = 0``):

    theta = theta_avg + lambda * sum_t SVD_k(c_t)

Every other parameter is ``theta_avg``, the simple average: the authors' code gives it
``theta_avg + lambda * sum_t c_t``, and the centered vectors sum to zero (up to
rounding). Which parameters are matrices: the authors' code cuts the weights of CLIP's
attention and MLP blocks (keys with ``attn`` or ``mlp``, without ``ln`` or ``bias``); a ConvNeXt
has no attention, and its 2-D tensors are exactly the blocks' MLP weights (``pwconv1``,
``pwconv2``), so those are cut here (as ``merging.spectral`` picks them: every 2-D tensor, on
any family; a ViT's attention and MLP weights; a ResNet has none, so CART is the simple average
there, which the run says in one line before merging).

With two models ``c_2 = -c_1``, whose top components are those of ``c_1`` negated: the sum
vanishes and CART is the simple average, whatever ``lambda`` and ``rank_ratio``.

Numbers and memory: the centering needs the average first, so a matrix's ``T`` task vectors
are kept (float32) while it is merged, as Iso-CTS keeps them; the truncations come from
``merging.spectral.top_singular`` (the Gram route, or the SVD where the spectrum needs it), in
float64, and the result is rounded once. Against the authors' code: ``benchmarks/authors_cart.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod, register_method
from merging.spectral import matrix_keys, top_singular


def cart_rank(rank: int, rank_ratio: float) -> int:
    """Components kept per centered task matrix: ``max(1, int(rank_ratio * r))``, none at 0 (the
    authors' ``parsed_dim``)."""
    return 0 if rank_ratio == 0 else max(1, int(rank_ratio * rank))


def cart_merge(pretrained: Tensor, task_vectors: Iterable[Tensor], rank_ratio: float, scaling_factor: float) -> Tensor:
    """The CART merge of one parameter (see the module's docstring): for a matrix
    ``theta_avg + lambda * sum_t SVD_k(theta_t - theta_avg)``, for any other tensor ``theta_avg``."""
    vectors = [tau.to(torch.float32, copy=True) for tau in task_vectors]  # the stream may reuse one buffer
    if not vectors:
        raise MergeError("nothing to merge: no fine-tuned model")
    mean = torch.zeros(pretrained.shape, dtype=torch.float64)
    for tau in vectors:
        mean += tau
    mean /= len(vectors)
    merged = pretrained.to(torch.float64) + mean
    if pretrained.ndim != 2:
        return merged.to(torch.float32)
    keep = cart_rank(min(pretrained.shape), rank_ratio)
    low_rank = torch.zeros_like(mean)
    for tau in vectors:
        u, s, vh = top_singular(tau.to(torch.float64) - mean, keep)
        low_rank += (u * s) @ vh
    return (merged + scaling_factor * low_rank).to(torch.float32)


@register_method
class CART(MergeMethod):
    """CART (Choi et al., "Revisiting Weight Averaging for Model Merging", arXiv 2412.12153): per
    weight matrix (2-D tensor), ``theta_avg + lambda * sum_t SVD_k(theta_t - theta_avg)``, each
    fine-tuned model's deviation from the average cut to its top ``k = max(1, int(rank_ratio * r))``
    singular components; every other tensor the average ``theta_avg`` (``merging.cart``). Data-free.
    With two models it is the simple average.

    Args:
        rank_ratio: share of each matrix's rank kept per centered task vector, in [0, 1] (the
            authors' 0.12 for eight ViT-B/32 tasks, 0.16 for 14, 0.32 for 20).
        scaling_factor: lambda, applied to the sum of the truncated centered vectors (their
            "prior": 2.0, 1.5 and 1.9 for 8, 14 and 20 tasks).
    """

    name = "cart"
    propagates_non_finite = False  # decompositions: check every input

    def __init__(self, rank_ratio: float, scaling_factor: float) -> None:
        if not 0 <= rank_ratio <= 1:
            raise MergeError(f"rank_ratio must be in [0, 1], got {rank_ratio}")
        if not math.isfinite(scaling_factor):
            raise MergeError(f"scaling_factor must be a finite number, got {scaling_factor}")
        self.rank_ratio = rank_ratio
        self.scaling_factor = scaling_factor

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"rank_ratio": self.rank_ratio, "scaling_factor": self.scaling_factor}

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return cart_merge(pretrained, tensors, self.rank_ratio, self.scaling_factor)

    def special_keys(
        self, shapes: Mapping[str, tuple[int, ...]], grams: Mapping[str, Sequence[Tensor]] | None
    ) -> list[str] | None:
        return matrix_keys(shapes)

    def plain_merge_note(self, num_tasks: int) -> str:
        return (
            "none of its tensors is a 2-D weight matrix (its convolutions are 4-D kernels), so nothing is cut to low "
            "rank and every tensor is the average of the fine-tuned models: this merge is the simple average"
        )
