"""Model Stock (Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models",
ECCV 2024, arXiv 2403.19522): the average of the fine-tuned models pulled towards the pretrained
one, layer by layer, by how far apart their task vectors point.

For one parameter tensor (the paper's "layer"; every tensor of the backbone, matrices,
convolutions, LayerNorms, biases and layer scales alike), with ``tau_t = theta_t - theta_0``:

    cos_ij = <tau_i, tau_j> / (||tau_i|| ||tau_j||)            (0 where a task vector is 0)
    phi    = mean_{i < j} arccos(cos_ij)                        (the mean pairwise angle)
    t      = T cos(phi) / (1 + (T - 1) cos(phi))
    theta  = theta_0 + t * (1/T) sum_t tau_t  =  t * mean_t theta_t + (1 - t) * theta_0

The paper derives ``t`` for ``T`` fine-tuned models that all meet at one angle ``phi`` (its
"thin shell"); for a pool whose pairs meet at different angles it does not say which ``phi`` to
take. FusionBench 0.2.33 (``fusion_bench.method.model_stock.ModelStock``) averages the pairwise
angles, in degrees, and so does this module (radians: the same mean). It has no
hyper-parameter. Against FusionBench: ``benchmarks/fusionbench_datafree.py``.

Numbers: the dot products are summed in float64 (a float32 sum of a few million products
would lose the angle's last digits), the merge is computed in float64 and rounded once.
FusionBench adds ``1e-8`` to the norms' product and to the denominator of ``t``, which
changes nothing at float32 precision but the case of a zero task vector, where both give 0.

Memory: the angles need every pair of task vectors of a tensor, so the ``T`` task vectors of
one tensor are kept (float32) while it is merged, as Iso-CTS keeps them; nothing of another
tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod, register_method

#: Entries per block of the float64 Gram matrix of the task vectors: a block of every task
#: stays small whatever the tensor's size.
GRAM_BLOCK = 1 << 16


def task_vector_gram(vectors: Sequence[Tensor]) -> Tensor:
    """``G_ij = <tau_i, tau_j>`` over all entries, summed in float64 a block at a time."""
    flat = [vector.reshape(-1) for vector in vectors]
    gram = torch.zeros(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    for start in range(0, flat[0].numel(), GRAM_BLOCK):
        block = torch.stack([vector[start : start + GRAM_BLOCK] for vector in flat]).to(torch.float64)
        gram += block @ block.T
    return gram


def mean_pairwise_angle(gram: Tensor) -> float:
    """The mean over ``i < j`` of ``arccos(cos_ij)`` (radians) from the Gram matrix; a pair with a
    zero vector has ``cos = 0`` (a right angle)."""
    norms = gram.diagonal().sqrt()
    count = gram.shape[0]
    angles = []
    for i in range(count):
        for j in range(i + 1, count):
            product = float(norms[i] * norms[j])
            cosine = float(gram[i, j]) / product if product > 0 else 0.0
            angles.append(math.acos(min(1.0, max(-1.0, cosine))))
    return sum(angles) / len(angles)


def interpolation_ratio(cosine: float, num_models: int) -> float:
    """Model Stock's ``t = T cos(phi) / (1 + (T - 1) cos(phi))``."""
    return num_models * cosine / (1 + (num_models - 1) * cosine)


def model_stock(pretrained: Tensor, task_vectors: Iterable[Tensor]) -> Tensor:
    """The Model Stock merge of one parameter tensor (see the module's docstring):
    ``theta_0 + t * (1/T) sum_t tau_t`` with ``t`` from the mean pairwise angle of the ``tau_t``.

    Raises ``MergeError`` with fewer than two task vectors (there is no angle)."""
    vectors = [tau.to(torch.float32, copy=True) for tau in task_vectors]  # the stream may reuse one buffer
    if len(vectors) < 2:
        raise MergeError(f"Model Stock needs at least two fine-tuned models (the angle between them), got {len(vectors)}")
    ratio = interpolation_ratio(math.cos(mean_pairwise_angle(task_vector_gram(vectors))), len(vectors))
    total = torch.zeros(pretrained.shape, dtype=torch.float64, device=pretrained.device)
    for tau in vectors:
        total += tau
    return (pretrained.to(torch.float64) + (ratio / len(vectors)) * total).to(torch.float32)


@register_method
class ModelStock(MergeMethod):
    """Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522): per parameter tensor,
    ``theta_0 + t * mean_t tau_t`` with ``t = T cos(phi) / (1 + (T - 1) cos(phi))`` and ``phi`` the
    mean angle between pairs of task vectors; every tensor, matrix or not, gets its own ``t``
    (``merging.model_stock``). No hyper-parameter; needs two or more fine-tuned models."""

    name = "model_stock"
    propagates_non_finite = False  # angles: a NaN input would become a ratio, not stay a NaN entry

    def prepare(self, tasks: Sequence[str], keys: Sequence[str]) -> None:
        if len(tasks) < 2:
            raise MergeError(f"Model Stock needs at least two fine-tuned models (the angle between them), got {len(tasks)}")

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return model_stock(pretrained, tensors)
