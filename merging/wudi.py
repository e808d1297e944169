"""WUDI-Merging (Cheng, Xiong, Wei, Zhu and Yuan, "Whoever Started the Interference Should End
It: Guiding Data-Free Model Merging via Task Vectors", ICML 2025, arXiv 2503.08099): each
weight matrix's merged task vector found by Adam on an interference loss that the task vectors
themselves define, without data.

For a weight matrix (a 2-D tensor: ConvNeXt's ``pwconv1`` / ``pwconv2`` Linear weights, as in
FusionBench 0.2.33's ``wudi_merging``, which optimises every ``len(shape) == 2`` parameter), with
``tau_t = theta_t - theta_0`` (``m x n``, ``n`` the layer's inputs) and ``tau_m`` the merged task
vector:

    L(tau_m) = sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2

(the paper's bound on the interference of ``tau_m`` on task ``t``, whose inputs span roughly the
rows of ``tau_t``), minimised from ``tau_m = sum_t tau_t`` by ``iter_num`` steps of Adam
(learning rate ``lr``, the reference's 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay);
``theta = theta_0 + tau_m``, no scaling factor. Every other parameter (convolutions,
LayerNorms, biases, layer scales): ``theta = theta_0 + (1/T) sum_t tau_t``, as FusionBench does.
Other families (``common.architectures``): the same ``len(shape) == 2`` rule, so a ViT's attention
and MLP weights are optimised; a ResNet's backbone has no 2-D tensor (its convolutions are 4-D
kernels), so the merge is the simple average there, which the run says in one line before merging.

The gradient, in closed form: with ``G_t = tau_t^T tau_t / ||tau_t||_F^2`` (``n x n``),

    dL/dtau_m = 2 sum_t (tau_m - tau_t) G_t = 2 (tau_m A - B),   A = sum_t G_t,  B = sum_t tau_t G_t

so ``A`` and ``B`` are summed once, as the task vectors stream in (in float64), and each Adam
step is one ``m x n x n`` product, whatever ``T``: memory holds ``A``, ``B``, ``tau_m`` and Adam's
two moments, never the ``T`` task vectors (FusionBench stacks them and differentiates the loss
with autograd, ``2 T`` products of ``m x n x m`` a step). The same gradient, so the same Adam
steps up to rounding: ``benchmarks/fusionbench_datafree.py`` compares the two. A task vector
that is zero adds nothing to the loss (its term is ``0/0`` in FusionBench, a NaN) and is left
out of ``A`` and ``B``.

The Adam steps run in float32 (the reference's precision) with ``torch.optim.Adam`` on the
merge device: the current CUDA device where torch sees one (Lightning sets it to each
process's GPU before the merge), the CPU otherwise; results come back to the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod, register_method
from merging.spectral import matrix_keys

#: Adam's settings in the reference (``torch.optim.Adam(lr=1e-5, weight_decay=0)``, torch's defaults otherwise).
BETAS = (0.9, 0.999)
EPS = 1e-8


def merge_device() -> torch.device:
    """The current CUDA device where torch sees one, the CPU otherwise."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def interference_terms(task_vectors: Iterable[Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(sum_t tau_t, A, B, T)`` of a matrix's stream of task vectors, in float64 on ``device``:
    ``A = sum_t G_t``, ``B = sum_t tau_t G_t``, ``G_t = tau_t^T tau_t / ||tau_t||_F^2``."""
    total = gram_sum = weighted = None
    count = 0
    for tau in task_vectors:
        tau = tau.to(device=device, dtype=torch.float64)
        if total is None:
            total = torch.zeros_like(tau)
            gram_sum = tau.new_zeros(tau.shape[1], tau.shape[1])
            weighted = torch.zeros_like(tau)
        total += tau
        count += 1
        squared_norm = float(torch.linalg.vector_norm(tau)) ** 2
        if squared_norm == 0:
            continue  # no interference to end: its term of the loss is 0
        gram = (tau.T @ tau) / squared_norm
        gram_sum += gram
        weighted += tau @ gram
    if total is None:
        raise MergeError("nothing to merge: no fine-tuned model")
    return total, gram_sum, weighted, count


def wudi_merge(
    pretrained: Tensor,
    task_vectors: Iterable[Tensor],
    iter_num: int,
    lr: float = 1e-5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """The WUDI merge of one parameter (see the module's docstring): for a matrix, ``theta_0 +
    tau_m`` with ``tau_m`` after ``iter_num`` Adam steps on the interference loss from ``sum_t
    tau_t``; any other tensor ``theta_0 + mean_t tau_t``. ``dtype``: of the Adam steps (float32
    as the reference; the tests run float64); ``device``: where they run (``merge_device()``)."""
    device = device or merge_device()
    if pretrained.ndim != 2:
        total, count = None, 0
        for tau in task_vectors:
            total = tau.to(torch.float64, copy=True) if total is None else total.add_(tau)
            count += 1
        if total is None:
            raise MergeError("nothing to merge: no fine-tuned model")
        return (pretrained.to(torch.float64) + total / count).to(torch.float32)
    total, gram_sum, weighted, _ = interference_terms(task_vectors, device)
    merged = torch.nn.Parameter(total.to(dtype))
    gram_sum, weighted = gram_sum.to(dtype), weighted.to(dtype)
    del total
    optimizer = torch.optim.Adam([merged], lr=lr, betas=BETAS, eps=EPS, weight_decay=0)
    with torch.no_grad():
        for _ in range(iter_num):
            merged.grad = (merged @ gram_sum).sub_(weighted).mul_(2)
            optimizer.step()
    return (pretrained.to(torch.float64) + merged.detach().to(device="cpu", dtype=torch.float64)).to(torch.float32)


@register_method
class WUDIMerging(MergeMethod):
    """WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099): per weight matrix (2-D tensor),
    ``theta_0 + tau_m`` with ``tau_m`` from ``sum_t tau_t`` after ``iter_num`` Adam steps on the
    interference loss ``sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2``, on the merge device
    (the current GPU where there is one); every other tensor ``theta_0 + mean_t tau_t``
    (``merging.wudi``). Data-free; no scaling factor.

    Args:
        iter_num: Adam steps per matrix (FusionBench's function runs 300, its config 400).
        lr: Adam's learning rate (the reference's 1e-5).
    """

    name = "wudi"
    propagates_non_finite = False  # an optimisation: check every input

    def __init__(self, iter_num: int, lr: float = 1e-5) -> None:
        if isinstance(iter_num, bool) or not isinstance(iter_num, int) or iter_num < 0:
            raise MergeError(f"iter_num must be an integer >= 0, got {iter_num}")
        if not (math.isfinite(lr) and lr > 0):
            raise MergeError(f"lr must be a finite number > 0, got {lr}")
        self.iter_num = iter_num
        self.lr = lr

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"iter_num": self.iter_num, "lr": self.lr}

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return wudi_merge(pretrained, tensors, self.iter_num, self.lr)

    def special_keys(
        self, shapes: Mapping[str, tuple[int, ...]], grams: Mapping[str, Sequence[Tensor]] | None
    ) -> list[str] | None:
        return matrix_keys(shapes)

    def plain_merge_note(self, num_tasks: int) -> str:
        return (
            "none of its tensors is a 2-D weight matrix (its convolutions are 4-D kernels), so no interference loss is "
            f"optimised and every tensor gets the mean task vector: this merge is task arithmetic with scaling_factor "
            f"1/{num_tasks} = {1 / num_tasks:g}, the simple average"
        )
