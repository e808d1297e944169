"""Tolerances derived from floating-point arithmetic, for tests that compare two computations.

Two computations of the same quantity in float32 agree only up to rounding, and the rounding
depends on the order of the operations: the kernels torch runs differ from one CPU to another
(AVX2, AVX-512 and AMX code block and vectorise their sums differently, and fuse multiply-adds
or not) and with the shape of a batch. A tolerance here is therefore never a number that one
machine happened to satisfy (``atol=1e-6`` failed at 1.6e-6 on an AMX machine): it is one of
the bounds below, from the standard error analysis (N. J. Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., SIAM 2002), which holds on every IEEE-754 machine:

* every operation is exact up to a factor ``1 + d`` with ``|d| <= u``, the unit roundoff
  (``2**-24`` in float32, ``2**-53`` in float64);
* a sum or dot product of ``n`` terms, in any order, with or without fused multiply-adds, differs
  from the exact value by at most ``gamma_n * sum |terms|``, ``gamma_n = n u / (1 - n u)``
  (Higham (3.4) and Lemma 3.1); a chain of ``n`` such roundings has the same bound;
* two computations that each satisfy a bound differ by at most the sum of the two.

Where the result of a computation is not a short chain of operations (a network's gradients
followed by Adam steps), the tests compare it in float64 instead: every first-order rounding
error of the same computation then shrinks by ``U32 / U64 = 2**29``.

Where two computations are the same operations on the same inputs on the same machine (a run
resumed from a checkpoint against an uninterrupted one, each rank's merge against the other's),
the tests compare bit for bit: that is determinism, which does not depend on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from transformers import ConvNextConfig

#: Unit roundoff of float32 and float64 (half the machine epsilon).
U32 = 2.0**-24
U64 = 2.0**-53


#: Relative bound (normwise) on the difference of two float64 evaluations of the same quantity,
#: in any order and with any kernels. To first order each errs by ``K U64``, ``K`` the amplification
#: of the computation (its condition, the number of its roundings), the same ``K`` as in float32;
#: and ``K U32 < 1`` wherever the float32 evaluation keeps a correct leading digit, which the
#: project's float32 runs presume. So each errs by less than ``U64 / U32 = 2**-29``: two by twice that.
FLOAT64_RTOL = 2 * U64 / U32


def gamma(n: int, u: float = U32) -> float:
    """``gamma_n = n u / (1 - n u)``: the relative error bound of ``n`` accumulated roundings."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n} is unbounded at u = {u}")
    return n * u / (1 - n * u)


def sum_of_magnitudes(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum_t |x_t|`` entrywise, in float64."""
    total = None
    for tensor in tensors:
        magnitude = tensor.detach().to(torch.float64).abs()
        total = magnitude if total is None else total + magnitude
    if total is None:
        raise ValueError("no tensors")
    return total


def assert_within(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float, what: str = "") -> None:
    """``|got - expected| <= bound`` entrywise (in float64), naming the worst entry otherwise."""
    got, expected = got.detach().to(torch.float64), expected.detach().to(torch.float64)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(got)
    excess = (got - expected).abs() - bound
    if excess.numel() and bool((excess > 0).any()):
        index = int(excess.reshape(-1).argmax())
        raise AssertionError(
            f"{what}: entry {index} differs by {float((got - expected).reshape(-1)[index].abs()):.3e}, "
            f"more than its bound {float(bound.reshape(-1)[index]):.3e} (got {float(got.reshape(-1)[index])!r}, "
            f"expected {float(expected.reshape(-1)[index])!r})"
        )


def linear_merge_bound(pretrained: torch.Tensor, vectors: Sequence[torch.Tensor], scale: float, roundings: int = 3):
    """Entrywise bound on the difference between two float32 evaluations (in any order) of
    ``theta_0 + scale * m`` where ``m`` is a sum of, or a mean over a subset of, the task
    vectors ``vectors`` (task arithmetic, TIES' disjoint mean, DARE's rescaled vectors given
    rescaled): each evaluation errs by at most ``gamma_{T + roundings} * (|theta_0| + |scale|
    sum_t |tau_t|)`` (``T - 1`` additions, the task vectors' own subtraction, one division or
    product, the final addition: ``roundings`` counts those beyond the sum), and two by twice that."""
    magnitude = pretrained.detach().to(torch.float64).abs() + abs(scale) * sum_of_magnitudes(vectors)
    return 2 * gamma(len(vectors) + roundings) * magnitude


def rounded_once(expected: torch.Tensor) -> torch.Tensor:
    """The error of rounding a float64 result to float32 once: ``u |x|`` (plus the smallest
    subnormal's half-spacing, where ``x`` underflows)."""
    return U32 * expected.detach().to(torch.float64).abs() + 2.0**-150


def float64_results_bound(expected: torch.Tensor) -> torch.Tensor:
    """Entrywise bound on the difference of two float64 computations of the same tensor, each
    rounded to float32 once: ``FLOAT64_RTOL ||x||_F`` (an entry is at most the norm) and the two
    roundings, ``2 u |x|``."""
    expected = expected.detach().to(torch.float64)
    return FLOAT64_RTOL * torch.linalg.vector_norm(expected) + 2 * rounded_once(expected)


def convnext_roundings(config: ConvNextConfig) -> int:
    """Float32 roundings accumulated along the longest path of a ConvNeXt forward, input pixels to
    pooled features: per convolution or linear layer the length of its dot products, per LayerNorm
    ``2 C`` (mean and variance), per block five more (GELU, layer scale, residual, the norm's scale
    and shift), and the pooling's sum over the last stage's positions. To first order the layers'
    errors add (each relative to its activations' scale, which the LayerNorms keep near 1), so
    ``gamma`` of this count bounds the features' relative error."""
    patch, channels = config.patch_size, config.num_channels
    count = channels * patch * patch + 2 * config.hidden_sizes[0]  # patch embedding and its norm
    previous, side = config.hidden_sizes[0], config.image_size // patch
    for stage, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
        if stage > 0:  # downsampling: a norm and a 2x2 stride-2 convolution
            count += 2 * previous + 4 * previous
            side //= 2
        count += depth * (49 + 2 * width + width + 4 * width + 5)  # dwconv 7x7, norm, pwconv1, pwconv2, rest
        previous = width
    return count + max(side, 1) ** 2 + 2 * previous  # the pooling and the final norm


def logit_bound(config: ConvNextConfig, head_scale: torch.Tensor, u: float = U32) -> torch.Tensor:
    """Entrywise bound on the difference between a forward of a ConvNeXt classifier with unit
    roundoff ``u`` (the project's evaluation: any kernels, batches, processes) and a float64 one of
    the same weights on the same images (the tests' reference): the features err by ``gamma_K |f|``
    (``convnext_roundings``) and the head's dot products of length ``C`` add ``gamma_C``, both
    relative to ``head_scale = |W| |f| + |b|``; the reference's own error is the same in float64."""
    roundings = convnext_roundings(config) + config.hidden_sizes[-1] + 1
    return (gamma(roundings, u) + gamma(roundings, U64)) * head_scale.to(torch.float64)


def loss_bound(logits: torch.Tensor, logit_error: torch.Tensor, labels: torch.Tensor, batches: int, u: float = U32) -> float:
    """Bound on the difference between the project's mean cross-entropy over ``N`` samples, from
    logits within ``logit_error`` of ``logits`` and computed with unit roundoff ``u``, and the
    float64 cross-entropy of ``logits``. Cross-entropy ``logsumexp(z) - z_y`` has the gradient
    ``p - y`` (softmax minus one-hot), so to first order it moves by at most ``sum_j |p_j - y_j|
    e_j``, plus at most ``max_j e_j ** 2`` (its Hessian ``diag(p) - p p^T`` has norm <= 1);
    evaluating it adds ``gamma_{C + 3} (max |z| + log C)`` per sample; the mean, accumulated by
    ``MeanMetric`` in float32 (its state stays float32 in any precision) in ``N + batches`` parts
    (each batch's mean times its size), adds ``gamma_{N + batches + 1}`` of the mean loss
    (positive terms), the reference's float64 mean ``gamma_N(U64)``."""
    logits, error = logits.detach().to(torch.float64), logit_error.detach().to(torch.float64)
    samples, classes = logits.shape
    gradient = torch.softmax(logits, dim=1) - torch.nn.functional.one_hot(labels, classes)
    first_order = (gradient.abs() * error).sum(dim=1)
    per_sample = first_order + error.amax(dim=1) ** 2 + gamma(classes + 3, u) * (logits.abs().amax(dim=1) + math.log(classes))
    mean_loss = float(torch.logsumexp(logits, dim=1).sub(logits.amin(dim=1)).mean())  # >= every CE: a safe scale
    return float(per_sample.mean()) + (gamma(samples + batches + 1) + gamma(samples, U64)) * mean_loss


def ambiguous_predictions(logits: torch.Tensor, logit_error: torch.Tensor) -> int:
    """Samples whose top prediction could differ between two forwards whose logits differ by at
    most ``logit_error``: the gap between the two largest logits is within twice the error."""
    logits = logits.detach().to(torch.float64)
    top2 = logits.topk(2, dim=1).values
    return int((top2[:, 0] - top2[:, 1] <= 2 * logit_error.to(torch.float64).amax(dim=1)).sum())


def mean_rtol(terms: int, u: float = U32) -> float:
    """Relative bound on the difference between two evaluations, in any order (per process, then
    over processes), of a mean of ``terms`` non-negative values that are themselves identical:
    ``2 gamma_{terms + 1}`` (the sum and the division)."""
    return 2 * gamma(terms + 1, u)
