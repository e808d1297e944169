"""Spectral merge methods: task singular vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS).

Each works on the weight *matrices* through their singular value decomposition and averages
every other parameter. Notation as in ``merging.methods``: ``theta_0`` the pretrained tensor,
``tau_t = theta_t - theta_0`` task ``t``'s task vector, ``T`` the number of fine-tuned models,
``alpha`` the scaling factor; for a matrix, ``r = min(rows, columns)`` its full rank and
``svd(M) = U S V^T`` the thin SVD.

Which parameters are matrices: exactly those whose tensor is 2-D (``len(shape) == 2``), as in
the papers' code and in FusionBench 0.2.33 (``TaskSingularVectorMerging``,
``IsotropicMergingInCommonSubspace`` and ``IsotropicMergingInCommonAndTaskSubspace`` with their
default ``exclude_keys``: none); every other parameter gets the papers' rule for non-matrix
parameters, the mean task vector: ``theta = theta_0 + alpha * (1/T) sum_t tau_t``. Per family
(``common.architectures``):

- ConvNeXt and ConvNeXt-V2: the matrices are the ``pwconv1`` / ``pwconv2`` Linear weights
  (``4C x C`` and ``C x 4C``); the 4-D convolutions (4x4 patch embedding, 2x2 downsampling, 7x7
  depthwise), the LayerNorms, the layer-scale vectors (V2: the GRN vectors) and every bias are not.
- ViT and DINOv2: the query, key, value, attention-output and both MLP Linear weights
  (``C x C``, ``4C x C``, ``C x 4C``); the patch embedding (a 4-D convolution), the CLS token
  (``1 x 1 x C``) and the position embeddings (``1 x (N + 1) x C``) are not matrices here and get
  the mean, as do the LayerNorms, biases and DINOv2's layer scale. (The papers' CLIP code stores
  OpenCLIP's position embedding as an ``(N + 1) x C`` matrix and decomposes it; transformers'
  ViT holds it 3-D, so it is averaged, as FusionBench does for the same model.) DINOv2's
  ``mask_token`` is ``1 x C`` and unused in classification: a zero task vector, rank-1 at most.
- Swin: the attention and MLP Linear weights, the patch-merging reductions, and the 2-D relative
  position bias tables (``(2w - 1)^2 x heads``), which the ``len(shape) == 2`` rule takes too.
- ResNet: none. Every weight is a 4-D convolution kernel (or a BatchNorm vector), so every
  tensor gets the mean task vector and the merge is task arithmetic with ``lambda = alpha / T``;
  the run says so in one line before merging. With ``conv_as_matrix`` (off by default, as in the
  papers) each 4-D kernel ``(out, in, k, k)`` is read as the ``out x (in k k)`` matrix of its
  im2col form (the map the convolution applies to each patch), merged as a matrix and reshaped
  back; in a ConvNeXt that also takes the patch embedding, the downsampling and the depthwise
  ``(C, 1, 7, 7)`` kernels (``C x 49``).

BatchNorm's running statistics are 1-D and get the mean task vector too; its integer
``num_batches_tracked`` is the pretrained model's (``merging.engine``).

Orthogonalisation ("whitening") of a matrix ``M = U S P^T`` is its orthogonal polar factor
``U P^T``: the nearest matrix with orthonormal columns (or rows). Everything runs in float64
(results are float32) on the device of the tensors. A singular vector's sign is arbitrary, but
every result below is a product in which each sign appears twice, so it is not.

The decompositions, in seconds and without failures. The papers' code and FusionBench take a
full SVD of every task matrix, of the sum and of the concatenations; only the top few singular
triplets of each are used (TSV-M: ``1/T`` of them per task). Here they come from the symmetric
eigendecomposition of the Gram matrix of the smaller side, ``A^T A = V S^2 V^T`` (``A V / S``
gives ``U``), and a polar factor is ``A (A^T A)^(-1/2)``. On a 2048 x 512 float64 task matrix
that is 0.12 s against the SVD's 0.43 s, 0.59 s against 2.8 s at 4096 x 1024. The
Gram route squares the condition number: it is taken where every used singular value is at
least ``2**-12`` of the largest (a squared condition within float32's ``2**24``, so within
``2**-29`` relative in float64, ``tests/tolerances.FLOAT64_RTOL``'s argument), and the SVD
otherwise. The SVD is LAPACK's divide and conquer (``gesdd``, torch's), and where that reports
no convergence (rank-deficient and ill-conditioned matrices can make it: Iso-CTS's residuals,
whose common subspace is projected out, are both) the QR-iteration driver ``gesvd`` (SciPy),
which converges where ``gesdd`` does not; a matrix on which both fail is one ``MergeError``.

Against FusionBench 0.2.33 (``benchmarks/fusionbench_spectral.py``) the formulas are the
same, non-matrix rule and scaling included, and so are the sizes (``tsv_rank``,
``iso_cts_dimensions``). FusionBench pads TSV-M's and Iso-CTS's concatenations with zero
columns up to ``r``; those carry zero singular values and change nothing, so they are left out
here. FusionBench's SVDs run in float32: on tiny ConvNeXt pools its results differ from these
by up to about 1e-5, and by one float32 rounding (< 3e-7) when it is run on float64 models.
The authors' CLIP code also averages CLIP's 2-D ``text_projection``; none of the families here has one.

The functions take one parameter's tensors, like those of ``merging.methods``; the classes at
the end are the ``MergeMethod``s that ``merging.engine`` streams a backbone through.
"""

from __future__ import annotations

import itertools
import math
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod, register_method

#: The Gram route (see the module's docstring) is taken where the smallest singular value it
#: uses is at least this share of the largest: its squared condition then stays within 2**24.
GRAM_MIN_RATIO = 2.0**-12


def is_matrix(tensor: Tensor) -> bool:
    """A parameter the spectral methods decompose: a 2-D tensor (FusionBench's ``len(shape) == 2``)."""
    return tensor.ndim == 2


def matrix_keys(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The keys of ``shapes`` whose tensors are 2-D weight matrices: what a method with a rule for
    matrices (TSV-M's, WUDI's, CART's) names in ``MergeMethod.special_keys``."""
    return [key for key, shape in shapes.items() if len(shape) == 2]


def robust_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``(U, S, V^T)``: LAPACK's ``gesdd`` (torch), and ``gesvd`` (SciPy, on the CPU)
    where ``gesdd`` fails to converge; one ``MergeError`` where both do."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as first:
        try:
            factors = scipy.linalg.svd(matrix.cpu().numpy(), full_matrices=False, lapack_driver="gesvd", check_finite=False)
        except (np.linalg.LinAlgError, ValueError) as second:
            shape = tuple(matrix.shape)
            raise MergeError(
                f"the SVD of a {shape} matrix failed to converge with gesdd ({first}) and gesvd ({second})"
            ) from second
        return tuple(torch.from_numpy(factor).to(matrix.device) for factor in factors)


def _top_eigenpairs(gram: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest eigenvalues of a symmetric matrix (descending) and their eigenvectors
    (columns), from torch's ``eigh`` (``syevd``): SciPy's subset driver computes fewer, but its
    BLAS threads and torch's then contend for the cores (ten times slower on two)."""
    size = gram.shape[0]
    values, vectors = torch.linalg.eigh(gram)
    return values[size - count :].flip(0), vectors[:, size - count :].flip(1)


def top_singular(matrix: Tensor, count: int, scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The ``count`` largest singular triplets ``(U[:, :count], S[:count], V^T[:count])`` of a
    float64 matrix: from its Gram matrix on the smaller side where ``S[count - 1] >=
    GRAM_MIN_RATIO * max(S[0], scale)``, from ``robust_svd`` otherwise (see the module's
    docstring). ``scale``: the size the matrix is a part of (Iso-CTS's residuals are what is left
    of a task matrix outside the common subspace; where that is rounding noise, the SVD gives
    orthonormal vectors for it, as the papers' code does, and the Gram route would not)."""
    if count == 0:
        rows, columns = matrix.shape
        return matrix.new_zeros(rows, 0), matrix.new_zeros(0), matrix.new_zeros(0, columns)
    tall = matrix.shape[0] >= matrix.shape[1]
    side = matrix if tall else matrix.T  # (long, short): its Gram is short x short
    values, vectors = _top_eigenpairs(side.T @ side, count)
    singular = values.clamp(min=0).sqrt()
    largest = max(float(singular[0]), scale or 0.0)
    if not largest > 0 or singular[-1] < GRAM_MIN_RATIO * largest:
        u, s, vh = robust_svd(matrix)
        return u[:, :count], s[:count], vh[:count]
    other = (side @ vectors) / singular  # the singular vectors of the long side
    return (other, singular, vectors.T) if tall else (vectors, singular, other.T)


def polar_and_spectrum(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(U P^T, S)`` for ``matrix = U S P^T`` (float64): ``A (A^T A)^(-1/2)`` with ``A^T A``'s
    eigendecomposition on the smaller side where the condition is at most ``1 / GRAM_MIN_RATIO``,
    from ``robust_svd`` otherwise."""
    if matrix.numel() == 0:  # TSV-M with more tasks than the rank keeps no component
        return matrix.clone(), matrix.new_zeros(0)
    tall = matrix.shape[0] >= matrix.shape[1]
    side = matrix if tall else matrix.T
    values, vectors = torch.linalg.eigh(side.T @ side)  # ascending
    if not values[-1] > 0 or values[0] < GRAM_MIN_RATIO**2 * values[-1]:
        u, s, vh = robust_svd(matrix)
        return u @ vh, s
    polar = side @ (vectors * values.rsqrt()) @ vectors.T
    return (polar if tall else polar.T), values.flip(0).sqrt()


def orthogonal_factor(matrix: Tensor) -> Tensor:
    """``U P^T`` for ``matrix = U S P^T``: the polar factor with orthonormal columns (rows if wide)."""
    return polar_and_spectrum(matrix)[0]


def tsv_rank(rank: int, num_tasks: int) -> int:
    """Singular components kept per task by TSV-M: ``floor(r / T)``, the rank share ``1/T``.

    (FusionBench computes ``int(r * (1 / T))``, which rounds one lower where ``1 / T`` is
    inexact, e.g. ``r = T = 49``; the two agree for every ``T <= 48`` and ``r <= 4096``.)"""
    return rank // num_tasks


def iso_cts_dimensions(rank: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k, s)``: Iso-CTS's common-subspace size ``k`` and task-specific size ``s`` per task.

    As the paper's code and FusionBench compute them: ``k0 = int(r * fraction)``, then the
    task-specific total ``(r - k0) / T`` rounded (Python's ``round``, half to even) to a
    multiple of ``T`` so that ``s`` is whole, ``k = r - T s``. ``k + T s = r`` always."""
    common = int(rank * common_space_fraction)
    per_task = round((rank - common) / num_tasks)
    common = rank - per_task * num_tasks
    if common < 0:
        raise MergeError(
            f"common_space_fraction {common_space_fraction} leaves {common} common dimensions for a rank-{rank} "
            f"matrix and {num_tasks} tasks ({per_task} task-specific ones each): choose a larger fraction"
        )
    return common, per_task


def _peek(tensors: Iterable[Tensor]) -> tuple[Tensor, Iterator[Tensor]]:
    iterator = iter(tensors)
    first = next(iterator, None)
    if first is None:
        raise MergeError("nothing to merge: no fine-tuned model")
    return first, itertools.chain([first], iterator)


def _add_scaled(pretrained: Tensor, merged: Tensor, scaling_factor: float) -> Tensor:
    """``theta_0 + alpha * merged``, rounded to float32 once."""
    return (pretrained.to(torch.float64) + scaling_factor * merged).to(torch.float32)


def _mean_merge(pretrained: Tensor, task_vectors: Iterable[Tensor], scaling_factor: float, num_tasks: int | None) -> Tensor:
    """``theta_0 + alpha * (1/T) sum_t tau_t``, the rule for non-matrix parameters (summed in float64)."""
    total, count = None, 0
    for tau in task_vectors:
        total = tau.to(torch.float64, copy=True) if total is None else total.add_(tau)
        count += 1
    _check_count(count, num_tasks, pretrained)
    return _add_scaled(pretrained, total.div_(count), scaling_factor)


def _check_count(count: int, num_tasks: int | None, pretrained: Tensor) -> None:
    if num_tasks is not None and count != num_tasks:
        raise MergeError(f"expected {num_tasks} task vectors for a {tuple(pretrained.shape)} parameter, got {count}")


def tsv_merge(pretrained: Tensor, task_vectors: Iterable[Tensor], scaling_factor: float, num_tasks: int | None = None) -> Tensor:
    """Task Singular Vectors merge, TSV-M (Gargiulo et al., CVPR 2025, arXiv 2412.00081), of one parameter.

    For a matrix: with ``k = floor(r / T)`` (``tsv_rank``) and ``tau_t = U_t S_t V_t^T``, keep
    each task's top ``k`` components and concatenate them,
    ``U = [U_1[:, :k], ..., U_T[:, :k]]``, ``S = diag(S_1[:k], ..., S_T[:k])``,
    ``V = [V_1[:, :k], ..., V_T[:, :k]]``; orthogonalise both sets of singular vectors
    (``U_perp = orthogonal_factor(U)``, likewise ``V_perp``), and
    ``theta = theta_0 + alpha * U_perp S V_perp^T``.
    With ``T > r`` no component is kept and the matrix stays ``theta_0`` (as in the paper's
    code and FusionBench). Any other parameter: ``theta_0 + alpha * mean_t tau_t``.

    Streams the task vectors: a matrix keeps only each task's ``k`` components, ``r (m + n)``
    numbers in all. ``num_tasks`` (needed to know ``k`` before the stream ends; checked against
    it) may be left out, and the task vectors are then read into a list first.
    """
    first, stream = _peek(task_vectors)
    if not is_matrix(first):
        return _mean_merge(pretrained, stream, scaling_factor, num_tasks)
    if num_tasks is None:
        materialised = [tau.clone() for tau in stream]  # the stream may reuse one buffer
        num_tasks, stream = len(materialised), iter(materialised)
    keep = tsv_rank(min(first.shape), num_tasks)
    lefts, values, rights, count = [], [], [], 0
    for tau in stream:
        u, s, vh = top_singular(tau.to(torch.float64), keep)
        # Copies, so that no full factor of a fallback SVD stays alive.
        lefts.append(u.clone())
        values.append(s.clone())
        rights.append(vh.clone())
        count += 1
    _check_count(count, num_tasks, pretrained)
    u_perp = orthogonal_factor(torch.cat(lefts, dim=1))
    vh_perp = orthogonal_factor(torch.cat(rights, dim=0))
    return _add_scaled(pretrained, (u_perp * torch.cat(values)) @ vh_perp, scaling_factor)


def iso_c(pretrained: Tensor, task_vectors: Iterable[Tensor], scaling_factor: float, num_tasks: int | None = None) -> Tensor:
    """Isotropic merging in the common subspace, Iso-C (Marczak et al., ICML 2025, arXiv 2502.04959).

    For a matrix: the task-arithmetic sum ``Delta = sum_t tau_t = U S V^T`` with its spectrum
    flattened, every singular value replaced by their mean ``sigma = (1/r) sum_i s_i``:
    ``theta = theta_0 + alpha * sigma U V^T``. Any other parameter:
    ``theta_0 + alpha * mean_t tau_t``. Streams: one running sum, whatever ``T``."""
    first, stream = _peek(task_vectors)
    if not is_matrix(first):
        return _mean_merge(pretrained, stream, scaling_factor, num_tasks)
    total, count = None, 0
    for tau in stream:
        total = tau.to(torch.float64, copy=True) if total is None else total.add_(tau)
        count += 1
    _check_count(count, num_tasks, pretrained)
    polar, s = polar_and_spectrum(total)
    return _add_scaled(pretrained, s.mean() * polar, scaling_factor)


def iso_cts(
    pretrained: Tensor,
    task_vectors: Iterable[Tensor],
    common_space_fraction: float,
    scaling_factor: float,
    num_tasks: int | None = None,
) -> Tensor:
    """Isotropic merging in common and task-specific subspaces, Iso-CTS (Marczak et al., ICML
    2025, arXiv 2502.04959), of one parameter.

    For a matrix, with ``(k, s) = iso_cts_dimensions(r, T, common_space_fraction)``:

    1. Common subspace: the top ``k`` components of ``Delta = sum_t tau_t = U S V^T``.
    2. Task-specific subspaces: each task with the common subspace projected out,
       ``tau_t - U_k U_k^T tau_t = U_t S_t V_t^T``, gives its top ``s`` components.
    3. The ``k + T s = r`` left and right singular vectors are concatenated and orthogonalised
       (``orthogonal_factor``: ``U_perp``, ``V_perp``), and the spectrum made isotropic: every
       singular value becomes the mean ``sigma`` of the ``r`` kept ones (``S[:k]`` and each
       ``S_t[:s]``).
    4. ``theta = theta_0 + alpha * sigma U_perp V_perp^T``.

    Any other parameter: ``theta_0 + alpha * mean_t tau_t``. A matrix needs all ``T`` task
    vectors at once (the common subspace comes from their sum); they are kept in float32.
    """
    first, stream = _peek(task_vectors)
    if not is_matrix(first):
        return _mean_merge(pretrained, stream, scaling_factor, num_tasks)
    vectors = [tau.to(torch.float32, copy=True) for tau in stream]
    _check_count(len(vectors), num_tasks, pretrained)
    common, per_task = iso_cts_dimensions(min(first.shape), len(vectors), common_space_fraction)
    total = torch.zeros(first.shape, dtype=torch.float64)
    for tau in vectors:
        total.add_(tau)
    u, s, vh = top_singular(total, common)
    basis = u.clone()  # copies: no full factor of a fallback SVD stays alive
    lefts, values, rights = [basis], [s.clone()], [vh.clone()]
    scale = float(s[0]) if common else None  # the sum's largest singular value
    del total, u, s, vh
    if per_task:
        for tau in vectors:
            tau = tau.to(torch.float64)
            residual = tau - basis @ (basis.T @ tau)
            u_t, s_t, vh_t = top_singular(residual, per_task, scale)
            lefts.append(u_t.clone())
            values.append(s_t.clone())
            rights.append(vh_t.clone())
    sigma = torch.cat(values).mean()
    u_perp = orthogonal_factor(torch.cat(lefts, dim=1))
    vh_perp = orthogonal_factor(torch.cat(rights, dim=0))
    return _add_scaled(pretrained, sigma * (u_perp @ vh_perp), scaling_factor)


def _check_scaling_factor(scaling_factor: float) -> None:
    if not (math.isfinite(scaling_factor) and scaling_factor > 0):
        raise MergeError(f"scaling_factor must be a finite number > 0, got {scaling_factor}")


class _Spectral(MergeMethod):
    """What the three share: task vectors in, every input checked (an SVD does not pass a NaN
    on as a NaN, it fails), whole tensors, ``T`` learnt in ``prepare``, and ``conv_as_matrix``."""

    propagates_non_finite = False
    scaling_factor: float
    conv_as_matrix: bool = False
    _num_tasks: int | None = None

    def prepare(self, tasks: Sequence[str], keys: Sequence[str]) -> None:
        self._num_tasks = len(tasks)

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"scaling_factor": self.scaling_factor, **self._conv_option()}

    def _conv_option(self) -> dict[str, bool]:
        # Named only when on, so that every method's name in the reports is the paper's by default.
        return {"conv_as_matrix": True} if self.conv_as_matrix else {}

    def _is_matrix(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 or (self.conv_as_matrix and len(shape) == 4)

    def special_keys(
        self, shapes: Mapping[str, tuple[int, ...]], grams: Mapping[str, Sequence[Tensor]] | None
    ) -> list[str] | None:
        return [key for key, shape in shapes.items() if self._is_matrix(shape)]

    def plain_merge_note(self, num_tasks: int) -> str:
        note = (
            "none of its tensors is a 2-D weight matrix (its convolutions are 4-D kernels), so every tensor gets the "
            f"mean task vector: this merge is task arithmetic with scaling_factor {self.scaling_factor:g}/{num_tasks} = "
            f"{self.scaling_factor / num_tasks:g}"
        )
        if not self.conv_as_matrix:
            note += "; --model.method.conv_as_matrix true reads each convolution kernel as an (out, in x k x k) matrix instead"
        return note

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        if self.conv_as_matrix and pretrained.ndim == 4:
            shape = pretrained.shape
            rows = (tau.reshape(shape[0], -1) for tau in tensors)
            return self.merge_tensor(pretrained.reshape(shape[0], -1), rows).reshape(shape)
        return self.merge_tensor(pretrained, tensors)

    @abstractmethod
    def merge_tensor(self, pretrained: Tensor, task_vectors: Iterable[Tensor]) -> Tensor:
        """The method's merge of one parameter (a matrix, or any other tensor)."""


def _check_conv_as_matrix(conv_as_matrix: bool) -> None:
    if not isinstance(conv_as_matrix, bool):
        raise MergeError(f"conv_as_matrix must be true or false, got {conv_as_matrix!r}")


@register_method
class TaskSingularVectors(_Spectral):
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
    Merging", CVPR 2025, arXiv 2412.00081): per weight matrix, each task's top ``1/T`` share of
    singular components, concatenated, their singular vectors orthogonalised,
    ``theta_0 + alpha * U_perp S V_perp^T``; other parameters ``theta_0 + alpha * mean_t tau_t``
    (``tsv_merge``).

    Args:
        scaling_factor: alpha, applied to the merged task vector (the paper's default 1.0).
        conv_as_matrix: also read each 4-D convolution kernel ``(out, in, k, k)`` as an
            ``out x (in k k)`` matrix (off: the paper's 2-D matrices only; a ResNet then has none).
    """

    name = "tsv_m"

    def __init__(self, scaling_factor: float = 1.0, conv_as_matrix: bool = False) -> None:
        _check_scaling_factor(scaling_factor)
        _check_conv_as_matrix(conv_as_matrix)
        self.scaling_factor = scaling_factor
        self.conv_as_matrix = conv_as_matrix

    def merge_tensor(self, pretrained: Tensor, task_vectors: Iterable[Tensor]) -> Tensor:
        return tsv_merge(pretrained, task_vectors, self.scaling_factor, self._num_tasks)


@register_method
class IsotropicCommon(_Spectral):
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025, arXiv 2502.04959): per weight matrix, the summed task
    vectors ``U S V^T`` with a flat spectrum, ``theta_0 + alpha * mean(S) U V^T``; other
    parameters ``theta_0 + alpha * mean_t tau_t`` (``iso_c``).

    Args:
        scaling_factor: alpha, applied to the merged task vector. The paper picks it on
            held-out validation data per backbone and number of tasks; 1.0 is FusionBench's
            configured default (its CLIP examples use 1.5).
        conv_as_matrix: also read each 4-D convolution kernel ``(out, in, k, k)`` as an
            ``out x (in k k)`` matrix (off: the paper's 2-D matrices only; a ResNet then has none).
    """

    name = "iso_c"

    def __init__(self, scaling_factor: float = 1.0, conv_as_matrix: bool = False) -> None:
        _check_scaling_factor(scaling_factor)
        _check_conv_as_matrix(conv_as_matrix)
        self.scaling_factor = scaling_factor
        self.conv_as_matrix = conv_as_matrix

    def merge_tensor(self, pretrained: Tensor, task_vectors: Iterable[Tensor]) -> Tensor:
        return iso_c(pretrained, task_vectors, self.scaling_factor, self._num_tasks)


@register_method
class IsotropicCommonTask(_Spectral):
    """Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959): per weight matrix, the top
    ``common_space_fraction`` of the summed task vectors' singular components plus each task's
    top components outside that common subspace, orthogonalised, with a flat spectrum (the
    mean of the kept singular values), scaled by alpha; other parameters
    ``theta_0 + alpha * mean_t tau_t`` (``iso_cts``).

    Args:
        common_space_fraction: share of the rank given to the common subspace (the paper's 0.8);
            the rest is split evenly between the tasks.
        scaling_factor: alpha, applied to the merged task vector. The paper picks it on
            held-out validation data per backbone and number of tasks; 1.0 is FusionBench's
            configured default (its CLIP examples use 1.5).
        conv_as_matrix: also read each 4-D convolution kernel ``(out, in, k, k)`` as an
            ``out x (in k k)`` matrix (off: the paper's 2-D matrices only; a ResNet then has none).
    """

    name = "iso_cts"

    def __init__(self, common_space_fraction: float = 0.8, scaling_factor: float = 1.0, conv_as_matrix: bool = False) -> None:
        if not 0 <= common_space_fraction <= 1:
            raise MergeError(f"common_space_fraction must be in [0, 1], got {common_space_fraction}")
        _check_scaling_factor(scaling_factor)
        _check_conv_as_matrix(conv_as_matrix)
        self.common_space_fraction = common_space_fraction
        self.scaling_factor = scaling_factor
        self.conv_as_matrix = conv_as_matrix

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"common_space_fraction": self.common_space_fraction, "scaling_factor": self.scaling_factor, **self._conv_option()}

    def merge_tensor(self, pretrained: Tensor, task_vectors: Iterable[Tensor]) -> Tensor:
        return iso_cts(pretrained, task_vectors, self.common_space_fraction, self.scaling_factor, self._num_tasks)


#: The spectral methods by name, merged into ``merging.METHODS``.
