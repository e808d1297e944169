"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023): the closed-form merge of every Linear layer from the Gram matrices of its inputs.

For a Linear layer ``y = x W^T`` (``W``: out x in), task ``t``'s fine-tuned weight ``W_t`` and
the matrix ``X_t`` of the inputs that layer sees in model ``t`` on task ``t``'s images (one row
per input vector: ConvNeXt's ``pwconv1``/``pwconv2`` see one per image and spatial position, a
ViT's Linear layers one per image and token),
the merged weight solves ``min_W sum_t ||X_t W^T - X_t W_t^T||^2``:

    W* = ( (sum_t G~_t)^{-1} sum_t G~_t W_t^T )^T,    G_t = X_t^T X_t / N_t,
    G~_t = a G_t + (1 - a) diag(G_t)

with ``N_t`` the number of rows of ``X_t`` and ``a`` (``reduce_non_diagonal_ratio``) shrinking
the off-diagonal entries toward the diagonal: ``a = 1`` is the least-squares merge itself,
``a = 0`` a per-input-feature weighted average (``G~_t`` diagonal). The shrink is the paper's
and the authors' code's (``reduce_non_diag``), as FusionBench 0.2.33 applies it
(``reduce_non_diagonal_elements``: the diagonal kept, every other entry times ``a``).
The paper writes ``G_t = X_t^T X_t``; the authors' code and FusionBench average over the
rows instead (``X_t^T X_t / N_t``), so every task weighs the same whatever its number of
images. With equal ``N_t`` the two are the same merge (a common factor cancels).

Every parameter that is not a Linear weight (convolutions, LayerNorms, biases, layer scale,
embeddings) is the simple average ``(1/T) sum_t theta_t``, as in the paper and in FusionBench,
which averages all but the ``.weight`` of the modules it hooked (``nn.Linear``); so are
BatchNorm's running statistics (its integer ``num_batches_tracked`` is the pretrained model's).

Which parameters are Linear weights: those of ``nn.Linear`` modules of the backbone
(``merging.grams.linear_layers``), found by module type as FusionBench finds them. Per family
(``common.architectures``):

- ConvNeXt and ConvNeXt-V2: exactly each block's ``pwconv1`` and ``pwconv2``;
- ViT and DINOv2: every Linear of every layer, the attention's query, key, value and output
  projections and the MLP's two layers (the inputs of each: the layer's tokens, CLS included);
  the patch embedding (a convolution), the CLS token, the position embeddings, the LayerNorms
  and DINOv2's layer scale are averaged;
- Swin: the attention's query, key, value and output projections, the MLP's layers and the
  patch-merging reductions;
- ResNet: none (every layer is a convolution): RegMean is then the simple average of every
  tensor, and the run says so in one line before merging.

The solve runs in float64 on the device of the Grams (``torch.linalg.solve``: an LU solve,
more accurate than FusionBench's explicit ``torch.inverse`` in float32); results are float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod, register_method, simple_average


def shrink_off_diagonal(gram: Tensor, reduce_non_diagonal_ratio: float) -> Tensor:
    """``a G + (1 - a) diag(G)``: the diagonal of ``G`` kept, every other entry times ``a``."""
    shrunk = gram * reduce_non_diagonal_ratio
    shrunk.diagonal().copy_(gram.diagonal())
    return shrunk


def regmean(weights: Iterable[Tensor], grams: Sequence[Tensor], reduce_non_diagonal_ratio: float) -> Tensor:
    """The RegMean merge of one Linear weight: ``W* = ((sum_t G~_t)^{-1} sum_t G~_t W_t^T)^T``.

    Args:
        weights: ``W_t`` (out x in) of each task, in the order of ``grams`` (a stream: each is
            copied to the Grams' device as it arrives).
        grams: ``G_t`` (in x in) of each task.
        reduce_non_diagonal_ratio: ``a`` of ``G~_t = a G_t + (1 - a) diag(G_t)``, in [0, 1].

    Raises ``MergeError`` on a count or shape mismatch and ``torch.linalg.LinAlgError`` when
    ``sum_t G~_t`` is singular.
    """
    if not grams:
        raise MergeError("RegMean: no Gram matrices")
    gram_sum: Tensor | None = None
    weighted_sum: Tensor | None = None
    count = 0
    for weight in weights:
        if count == len(grams):
            raise MergeError(f"RegMean: more weights than the {len(grams)} Gram matrices")
        gram = grams[count]
        if weight.ndim != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
            raise MergeError(
                f"RegMean: a weight of shape {list(weight.shape)} needs a Gram of {[weight.shape[-1]] * 2}, got {list(gram.shape)}"
            )
        shrunk = shrink_off_diagonal(gram.to(torch.float64), reduce_non_diagonal_ratio)
        weighted = shrunk @ weight.to(device=gram.device, dtype=torch.float64).T
        gram_sum = shrunk if gram_sum is None else gram_sum.add_(shrunk)
        weighted_sum = weighted if weighted_sum is None else weighted_sum.add_(weighted)
        count += 1
    if count != len(grams):
        raise MergeError(f"RegMean: {count} weights for {len(grams)} Gram matrices")
    return torch.linalg.solve(gram_sum, weighted_sum).T.to(torch.float32)


@register_method
class RegMean(MergeMethod):
    """RegMean (Jin et al., ICLR 2023): each Linear weight (ConvNeXt's ``pwconv1``/``pwconv2``, a
    ViT's query, key, value, output and MLP layers; a ResNet has none) in closed form from the Gram matrices of its inputs in every fine-tuned model on its own
    task's unlabelled train images, every other parameter the simple average (see
    ``merging.regmean``). Needs the Gram pass: set ``data.gram_images``.

    Args:
        reduce_non_diagonal_ratio: ``a`` in ``G~ = a G + (1 - a) diag(G)``, the weight kept on
            the Gram matrices' off-diagonal entries: 1 is the exact least-squares merge, 0
            uses their diagonals only (FusionBench's name; its CLIP default is 0.95).
    """

    name = "regmean"
    uses_pretrained = False
    propagates_non_finite = False  # a linear solve: check every input, not only the output
    needs_grams = True

    def __init__(self, reduce_non_diagonal_ratio: float = 0.95) -> None:
        if not 0 <= reduce_non_diagonal_ratio <= 1:
            raise MergeError(f"reduce_non_diagonal_ratio must be in [0, 1], got {reduce_non_diagonal_ratio}")
        self.reduce_non_diagonal_ratio = reduce_non_diagonal_ratio

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"reduce_non_diagonal_ratio": self.reduce_non_diagonal_ratio}

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return simple_average(tensors)

    def special_keys(
        self, shapes: Mapping[str, tuple[int, ...]], grams: Mapping[str, Sequence[Tensor]] | None
    ) -> list[str] | None:
        return list(grams or {})

    def plain_merge_note(self, num_tasks: int) -> str:
        return (
            "none of its layers is an nn.Linear (its layers are convolutions), so no Gram matrix is used and every "
            "tensor is the simple average: this merge is the simple average"
        )

    def merge_linear(self, weights: Iterable[Tensor], grams: Sequence[Tensor]) -> Tensor:
        return regmean(weights, grams, self.reduce_non_diagonal_ratio)
