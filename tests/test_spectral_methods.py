"""TSV-M, Iso-C and Iso-CTS (``merging.spectral``): exact values on hand-built matrices whose
SVD is known, the rules for rank share and non-matrix parameters, invariants, the streaming
engine against the formulas on loaded checkpoints, and one ``merge.py test`` run.

The expected values are worked out by hand or computed with a NumPy transcription of the
papers' code as FusionBench 0.2.33 runs it (zero-padded concatenations of ``r`` columns,
``int(r * (1/T))``), never with the helpers of ``merging.spectral``.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

import merge_fixtures as mf
from merge import main
from merging import METHODS, IsotropicCommon, IsotropicCommonTask, TaskSingularVectors
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.pool import ModelPool
from merging.spectral import (
    iso_c,
    iso_cts,
    iso_cts_dimensions,
    orthogonal_factor,
    polar_and_spectrum,
    top_singular,
    tsv_merge,
    tsv_rank,
)
from tolerances import FLOAT64_RTOL, U32, assert_within, float64_results_bound

pytestmark = pytest.mark.usefixtures("one_thread")

# A rotation by the 3-4-5 angle: the singular vectors of the hand-built matrices below.
R = [[0.6, -0.8], [0.8, 0.6]]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(result: torch.Tensor, expected) -> None:
    """``result`` (the project's float64 computation, rounded to float32) against ``expected`` (a
    float64 computation or an exact value): within ``float64_results_bound``."""
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    assert result.dtype == torch.float32 and result.shape == expected.shape
    assert_within(result, expected, float64_results_bound(expected))


def random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- The papers' code, transcribed to NumPy (float64) ---------------------------------------


def np_polar(matrix: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def reference_tsv(taus: list[np.ndarray]) -> np.ndarray:
    """The merged task matrix of TSV-M before alpha, as FusionBench builds it."""
    count, (rows, cols) = len(taus), taus[0].shape
    rank = min(rows, cols)
    keep = int(rank * (1 / count))
    u_all, s_all, v_all = np.zeros((rows, rank)), np.zeros(rank), np.zeros((rank, cols))
    for i, tau in enumerate(taus):
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        u_all[:, i * keep : (i + 1) * keep] = u[:, :keep]
        s_all[i * keep : (i + 1) * keep] = s[:keep]
        v_all[i * keep : (i + 1) * keep] = vh[:keep]
    return np_polar(u_all) @ np.diag(s_all) @ np_polar(v_all)


def reference_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def reference_iso_cts(taus: list[np.ndarray], fraction: float) -> np.ndarray:
    count, shape = len(taus), taus[0].shape
    rank = min(shape)
    common = int(rank * fraction)
    common = rank - round((rank - common) / count) * count
    per_task = int((rank - common) / count)
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    u_all, s_all, v_all = np.zeros((shape[0], rank)), np.zeros(rank), np.zeros((rank, shape[1]))
    for i, tau in enumerate(taus):
        residual = tau - u[:, :common] @ u[:, :common].T @ tau
        u_t, s_t, vh_t = np.linalg.svd(residual, full_matrices=False)
        u_all[:, i * per_task : (i + 1) * per_task] = u_t[:, :per_task]
        s_all[i * per_task : (i + 1) * per_task] = s_t[:per_task]
        v_all[i * per_task : (i + 1) * per_task] = vh_t[:per_task]
    u_all[:, count * per_task :], s_all[count * per_task :], v_all[count * per_task :] = u[:, :common], s[:common], vh[:common]
    return s_all.mean() * np_polar(u_all) @ np_polar(v_all)


def reference(method: str, params: dict, pretrained: dict, finetuned: list[dict]) -> dict[str, torch.Tensor]:
    """The merged backbone: the method on 2-D tensors, ``theta_0 + alpha * mean_t tau_t`` elsewhere."""
    merged = {}
    for key, theta in pretrained.items():
        theta = theta.double().numpy()
        # tau_t in float32, as the engine computes it (and FusionBench): the same inputs to both sides.
        taus = [(model[key] - pretrained[key]).double().numpy() for model in finetuned]
        if theta.ndim != 2:
            update = sum(taus) / len(taus)
        elif method == "tsv_m":
            update = reference_tsv(taus)
        elif method == "iso_c":
            update = reference_iso_c(taus)
        else:
            update = reference_iso_cts(taus, params["common_space_fraction"])
        merged[key] = torch.from_numpy(theta + params["scaling_factor"] * update)  # float64, to compare before rounding
    return merged


# --- Orthogonalisation ----------------------------------------------------------------------


def test_orthogonal_factor_of_a_rotation_times_a_positive_diagonal_is_the_rotation():
    # M = R diag(2, 5) = R P with P symmetric positive definite: its polar factor is R.
    matrix = torch.tensor(R, dtype=torch.float64) @ torch.diag(torch.tensor([2.0, 5.0], dtype=torch.float64))
    assert_within(orthogonal_factor(matrix), torch.tensor(R, dtype=torch.float64), FLOAT64_RTOL * math.sqrt(2))
    # 3x2 with orthogonal, unequal columns: the columns, normalised.
    tall = torch.tensor([[3.0, 0.0], [0.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    tall[1, 1] = -7.0
    expected = torch.tensor([[0.6, 0.0], [0.0, -1.0], [0.8, 0.0]], dtype=torch.float64)
    assert_within(orthogonal_factor(tall), expected, FLOAT64_RTOL * torch.linalg.vector_norm(expected))


# --- TSV-M: hand-built ------------------------------------------------------------------------


def test_tsv_one_task_2x2_known_svd_is_theta0_plus_alpha_tau():
    # tau = R diag(3, 1) R^T (singular values 3, 1): one task keeps both components.
    tau = (np.array(R) @ np.diag([3.0, 1.0]) @ np.array(R).T).tolist()
    pretrained = [[1.0, -2.0], [0.5, 0.0]]
    result = tsv_merge(t(pretrained), [t(tau)], 0.5)
    close(result, np.array(pretrained) + 0.5 * np.array(tau))


def test_tsv_two_tasks_with_orthogonal_task_vectors_is_their_sum():
    """3x3, T = 2: each task keeps floor(3/2) = 1 component, its whole rank-1 task vector;
    the kept singular vectors are already orthonormal, so TSV-M = task arithmetic."""
    tau1 = [[0.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]  # 3 e2 e3^T
    tau2 = [[-2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # 2 (-e1) e1^T
    pretrained = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    result = tsv_merge(t(pretrained), [t(tau1), t(tau2)], 1.0)
    close(result, np.array(pretrained) + np.array(tau1) + np.array(tau2))


def test_tsv_two_tasks_whose_singular_vectors_overlap_are_whitened():
    """2x2, T = 2: tau_1 = 3 e1 e1^T and tau_2 = 2 a b^T with a = (0.6, 0.8), b = (0.8, -0.6).
    U = [e1, a] and V = [e1, b] are not orthogonal; TSV-M replaces them by their polar factors
    (for a 2x2 matrix M with det M > 0: (M + cof M) / sqrt(det(M + cof M)))."""

    def polar_2x2(m):
        (a, b), (c, d) = m
        total = np.array([[a + d, b - c], [c - b, d + a]]) if a * d - b * c > 0 else np.array([[a - d, b + c], [c + b, d - a]])
        return total / math.sqrt(abs(np.linalg.det(total)))

    a, b = np.array([0.6, 0.8]), np.array([0.8, -0.6])
    u, v = np.array([[1.0, 0.6], [0.0, 0.8]]), np.array([[1.0, 0.8], [0.0, -0.6]])
    expected = polar_2x2(u) @ np.diag([3.0, 2.0]) @ polar_2x2(v).T
    tau1, tau2 = 3 * np.outer([1.0, 0.0], [1.0, 0.0]), 2 * np.outer(a, b)
    # tau_2's entries (0.96, ...) are not binary fractions: the float32 inputs are the exact ones
    # rounded, so the project's result is compared with the papers' code on those same inputs,
    # and that code with the closed form on the exact ones (both in float64).
    inputs = [t(tau1.tolist()), t(tau2.tolist())]
    result = tsv_merge(torch.zeros(2, 2), inputs, 1.0)
    close(result, reference_tsv([tau.double().numpy() for tau in inputs]))
    np.testing.assert_allclose(reference_tsv([tau1, tau2]), expected, rtol=0, atol=FLOAT64_RTOL * 3)
    assert not np.allclose(expected, tau1 + tau2, atol=1e-3)  # not task arithmetic
    np.testing.assert_allclose(np.linalg.svd(expected, compute_uv=False), [3.0, 2.0], rtol=0, atol=FLOAT64_RTOL * 3)


def test_tsv_keeps_each_tasks_top_share_of_the_rank_and_drops_the_rest():
    """4x4, T = 3: each task keeps floor(4/3) = 1 component. tau_t = (5 - t) e_t e_t^T + e4 e4^T:
    the shared e4 component (3 in task arithmetic) is each task's smaller one, so it goes."""
    taus = [np.diag([5.0, 0, 0, 1]), np.diag([0, 4.0, 0, 1]), np.diag([0, 0, 3.0, 1])]
    pretrained = np.arange(16, dtype=np.float64).reshape(4, 4) / 8
    result = tsv_merge(t(pretrained.tolist()), [t(tau.tolist()) for tau in taus], 0.5)
    close(result, pretrained + 0.5 * np.diag([5.0, 4.0, 3.0, 0.0]))
    assert [tsv_rank(4, 3), tsv_rank(64, 8), tsv_rank(512, 8), tsv_rank(8, 3), tsv_rank(2, 3)] == [1, 8, 64, 2, 0]


def test_tsv_with_more_tasks_than_the_rank_keeps_no_component():
    """2x2 and T = 3: floor(2/3) = 0 components per task, the matrix stays theta_0 (as in the
    paper's code and FusionBench)."""
    pretrained = t([[1.0, 2.0], [3.0, 4.0]])
    result = tsv_merge(pretrained, [random((2, 2), seed) for seed in range(3)], 1.0)
    assert torch.equal(result, pretrained)


# --- Iso-C: hand-built ----------------------------------------------------------------------


def test_iso_c_flattens_the_spectrum_of_the_sum():
    # Sum diag(3, 1): mean singular value 2, U V^T = I.
    pretrained = [[0.5, 1.0], [-1.0, 2.0]]
    result = iso_c(t(pretrained), [t([[2.0, 0.0], [0.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]])], 1.0)
    close(result, np.array(pretrained) + 2 * np.eye(2))


def test_iso_c_keeps_the_singular_vectors_of_the_sum():
    # Sum [[0, -4], [1, 0]] = [[0, -1], [1, 0]] diag(1, 4): singular values 4 and 1, U V^T the
    # quarter turn; mean 2.5; alpha 0.5.
    taus = [t([[0.0, -3.0], [0.0, 0.0]]), t([[0.0, -1.0], [1.0, 0.0]])]
    result = iso_c(torch.zeros(2, 2), taus, 0.5)
    close(result, 0.5 * 2.5 * np.array([[0.0, -1.0], [1.0, 0.0]]))


def test_iso_c_on_a_tall_matrix_uses_the_thin_svd():
    # 3x2 sum [[3, 0], [0, 1], [0, 0]]: r = 2 singular values 3 and 1, mean 2.
    result = iso_c(torch.zeros(3, 2), [t([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])], 1.0)
    close(result, [[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])


# --- Iso-CTS: hand-built --------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank, tasks, fraction, expected",
    [
        (8, 3, 0.8, (5, 1)),  # int(6.4) = 6; (8 - 6) / 3 rounds to 1; k = 8 - 3
        (8, 8, 0.8, (8, 0)),  # (8 - 6) / 8 rounds to 0: the common subspace only
        (64, 3, 0.8, (52, 4)),  # int(51.2) = 51; 13 / 3 rounds to 4
        (512, 8, 0.8, (408, 13)),  # convnext-base stage 3: int(409.6) = 409; 103 / 8 rounds to 13
        (9, 2, 0.5, (5, 2)),  # int(4.5) = 4; 5 / 2 = 2.5 rounds half to even, to 2
        (3, 2, 0.34, (1, 1)),
        (4, 2, 1.0, (4, 0)),
        (6, 3, 0.0, (0, 2)),
    ],
)
def test_iso_cts_dimensions(rank, tasks, fraction, expected):
    common, per_task = iso_cts_dimensions(rank, tasks, fraction)
    assert (common, per_task) == expected
    assert common + tasks * per_task == rank


def test_iso_cts_dimensions_that_cannot_be_split_raise():
    # int(0) = 0; 8 / 3 rounds to 3 task dimensions each, 9 > 8: no room for the common subspace.
    with pytest.raises(
        MergeError, match=r"common_space_fraction 0.0 leaves -1 common dimensions for a rank-8 matrix and 3 tasks"
    ):
        iso_cts_dimensions(8, 3, 0.0)


def test_iso_cts_recovers_a_task_direction_that_cancels_in_the_sum():
    """3x3, T = 2, fraction 0.34 -> (k, s) = (1, 1). tau_1 = diag(2, 1, 0), tau_2 = diag(2, -1, 2):
    the sum diag(4, 0, 2) has lost e2. Common: e1 (4). Outside it, task 1's top component is
    e2 e2^T (1), task 2's is e3 e3^T (2). Whitened they are e1, e2, e3; the flat spectrum is
    their mean (4 + 1 + 2) / 3, so the merged task matrix is 7/3 I."""
    pretrained = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 3.0]])
    taus = [t(np.diag([2.0, 1.0, 0.0]).tolist()), t(np.diag([2.0, -1.0, 2.0]).tolist())]
    result = iso_cts(t(pretrained.tolist()), taus, 0.34, 1.5)
    close(result, pretrained + 1.5 * 7 / 3 * np.eye(3))


def test_iso_cts_with_the_whole_rank_in_the_common_subspace_is_iso_c():
    pretrained = random((12, 5), 0)
    taus = [random((12, 5), seed) for seed in (1, 2, 3)]
    expected = iso_c(pretrained, taus, 1.3)
    assert_within(iso_cts(pretrained, taus, 1.0, 1.3), expected, float64_results_bound(expected))


# --- Non-matrix parameters ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4,), (2, 1, 2, 2), (2, 2, 1, 1, 1)])
@pytest.mark.parametrize(
    "merge",
    [
        lambda p, taus: tsv_merge(p, taus, 0.5),
        lambda p, taus: iso_c(p, taus, 0.5),
        lambda p, taus: iso_cts(p, taus, 0.8, 0.5),
    ],
    ids=["tsv_m", "iso_c", "iso_cts"],
)
def test_non_matrix_parameters_get_the_mean_task_vector(shape, merge):
    """Biases, norms, layer scale and convolutions (4-D): theta_0 + alpha * (1/T) sum_t tau_t,
    exact here (multiples of 1/8, T = 4)."""
    count = math.prod(shape)
    pretrained = [0.125 * i - 0.5 for i in range(count)]
    taus = [[((i * 3 + t_) % 7 - 3) * 0.25 for i in range(count)] for t_ in range(4)]
    expected = [p + 0.5 * sum(column) / 4 for p, column in zip(pretrained, zip(*taus))]
    result = merge(t(pretrained).reshape(shape), [t(tau).reshape(shape) for tau in taus])
    assert torch.equal(result, t(expected).reshape(shape))


# --- Against the transcription of the papers' code, and invariants --------------------------

SHAPES = [(32, 8), (8, 32), (12, 12), (64, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_random_matrices_against_the_papers_code(shape, count):
    pretrained = random(shape, 100)
    taus = [random(shape, seed) * 0.1 for seed in range(count)]
    as_numpy = [tau.double().numpy() for tau in taus]
    base = pretrained.double().numpy()
    close(tsv_merge(pretrained, taus, 0.7), base + 0.7 * reference_tsv(as_numpy))
    close(iso_c(pretrained, taus, 1.5), base + 1.5 * reference_iso_c(as_numpy))
    for fraction in (0.8, 0.5):
        close(iso_cts(pretrained, taus, fraction, 1.2), base + 1.2 * reference_iso_cts(as_numpy, fraction))


def test_iso_cts_without_a_common_subspace_against_the_papers_code():
    """fraction 0 with r = 12 and T = 3: (k, s) = (0, 4), every direction is task-specific."""
    pretrained = random((12, 12), 0)
    taus = [random((12, 12), seed) for seed in (1, 2, 3)]
    expected = pretrained.double().numpy() + reference_iso_cts([tau.double().numpy() for tau in taus], 0.0)
    close(iso_cts(pretrained, taus, 0.0, 1.0), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_one_task_full_rank_share_is_task_arithmetic(shape):
    pretrained, tau = random(shape, 1), random(shape, 2)
    for alpha in (1.0, 0.3):
        close(tsv_merge(pretrained, [tau], alpha), pretrained.double() + alpha * tau.double())


@pytest.mark.parametrize("shape", SHAPES)
def test_the_isotropic_updates_have_a_flat_spectrum(shape):
    pretrained = random(shape, 1)
    taus = [random(shape, seed) for seed in (2, 3, 4)]

    # The update read back from the float32 result carries that result's rounding E (|E| <= u |x|),
    # which moves each singular value by at most ||E||_2 <= u ||x||_F (Weyl); the float64 steps
    # add FLOAT64_RTOL of the update's norm.
    def spectrum_bound(result: torch.Tensor, update: torch.Tensor) -> float:
        return U32 * float(torch.linalg.vector_norm(result.double())) + FLOAT64_RTOL * float(torch.linalg.vector_norm(update))

    s_sum = torch.linalg.svdvals(sum(tau.double() for tau in taus))
    merged = iso_c(pretrained, taus, 1.0)
    iso_c_update = merged.double() - pretrained.double()
    flat = s_sum.mean().expand(min(shape))
    assert_within(torch.linalg.svdvals(iso_c_update), flat, spectrum_bound(merged, iso_c_update), "iso_c spectrum")
    merged = iso_cts(pretrained, taus, 0.5, 2.0)
    iso_cts_update = (merged.double() - pretrained.double()) / 2.0
    values = torch.linalg.svdvals(iso_cts_update)
    bound = spectrum_bound(merged, iso_cts_update) / 2.0
    assert_within(values, values.mean().expand(min(shape)), 2 * bound, "iso_cts spectrum")  # each value and the mean
    assert (iso_cts_update - iso_c_update).abs().max() > 0.1  # the task-specific directions count


@pytest.mark.parametrize(
    "merge",
    [
        lambda p, taus, n: tsv_merge(p, taus, 0.7, n),
        lambda p, taus, n: iso_c(p, taus, 0.7, n),
        lambda p, taus, n: iso_cts(p, taus, 0.8, 0.7, n),
    ],
    ids=["tsv_m", "iso_c", "iso_cts"],
)
def test_streams_lists_task_order_and_reruns_agree(merge):
    pretrained = random((24, 8), 0)
    taus = [random((24, 8), seed) for seed in (1, 2, 3)]
    reference_result = merge(pretrained, list(taus), None)

    def one_buffer():  # a stream that reuses one tensor, as a reader with a scratch buffer would
        buffer = torch.empty(24, 8)
        for tau in taus:
            buffer.copy_(tau)
            yield buffer

    assert torch.equal(merge(pretrained, one_buffer(), 3), reference_result)
    assert torch.equal(merge(pretrained, one_buffer(), None), reference_result)
    assert torch.equal(merge(pretrained, list(taus), None), reference_result)  # deterministic
    # Another order of the same float64 sums: within the bound (|x| of the float32 result is |x| of the
    # float64 one within a factor 1 + u, which rounded_once's spacing term covers at these sizes).
    assert_within(merge(pretrained, taus[::-1], 3), reference_result, float64_results_bound(reference_result))
    with pytest.raises(MergeError, match=r"expected 4 task vectors for a \(24, 8\) parameter, got 3"):
        merge(pretrained, iter(taus), 4)
    with pytest.raises(MergeError, match="no fine-tuned model"):
        merge(pretrained, iter([]), None)


# --- The classes ----------------------------------------------------------------------------


def test_methods_are_registered_and_described():
    assert METHODS["tsv_m"] is TaskSingularVectors
    assert METHODS["iso_c"] is IsotropicCommon
    assert METHODS["iso_cts"] is IsotropicCommonTask
    assert TaskSingularVectors().describe() == "tsv_m(scaling_factor=1)"
    assert IsotropicCommon(1.5).describe() == "iso_c(scaling_factor=1.5)"
    assert IsotropicCommonTask().describe() == "iso_cts(common_space_fraction=0.8, scaling_factor=1)"
    for cls in (TaskSingularVectors, IsotropicCommon, IsotropicCommonTask):
        assert not cls.elementwise and cls.uses_pretrained and not cls.propagates_non_finite
        assert "Args:" in cls.__doc__ and "arXiv" in cls.__doc__


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_scaling_factor_must_be_finite_and_positive(bad):
    for make in (TaskSingularVectors, IsotropicCommon, lambda a: IsotropicCommonTask(scaling_factor=a)):
        with pytest.raises(MergeError, match=f"scaling_factor must be a finite number > 0, got {bad}"):
            make(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_common_space_fraction_must_be_in_0_1(bad):
    with pytest.raises(MergeError, match=f"common_space_fraction must be in \\[0, 1\\], got {bad}"):
        IsotropicCommonTask(common_space_fraction=bad)


# --- The streaming engine against the formulas on loaded checkpoints ------------------------

TASKS = ("eurosat", "dtd", "mnist")
CASES = [
    (TaskSingularVectors, {"scaling_factor": 1.0}),
    (IsotropicCommon, {"scaling_factor": 1.5}),
    (IsotropicCommonTask, {"common_space_fraction": 0.8, "scaling_factor": 1.0}),
    (IsotropicCommonTask, {"common_space_fraction": 0.5, "scaling_factor": 0.7}),
]


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("pool"), TASKS)


@pytest.mark.parametrize("cls, params", CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_engine_equals_the_formula_on_loaded_state_dicts(pool_dirs, cls, params):
    pretrained = mf.backbone(mf.load_state(pool_dirs[mf.PRETRAINED]))
    finetuned = [mf.backbone(mf.load_state(pool_dirs[task])) for task in TASKS]
    merged = merge_backbone(ModelPool(pool_dirs), cls(**params), progress=False)
    expected = reference(cls.name, params, pretrained, finetuned)
    assert list(merged) == list(pretrained)
    matrices = [key for key, tensor in pretrained.items() if tensor.ndim == 2]
    assert matrices and all(key.endswith(("pwconv1.weight", "pwconv2.weight")) for key in matrices)
    assert len(matrices) == 8  # one block per stage, two Linear layers each
    for key, tensor in merged.items():
        assert tensor.dtype == pretrained[key].dtype and tensor.shape == pretrained[key].shape
        assert_within(tensor, expected[key], float64_results_bound(expected[key]), key)
        assert not torch.equal(tensor, pretrained[key]), key


# --- merge.py, in-process -------------------------------------------------------------------

SIZES = {"eurosat": 21, "dtd": 10}


def test_merge_cli_iso_cts_report_equals_an_independent_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["merge.py"])
    monkeypatch.chdir(tmp_path)
    tasks = tuple(SIZES)
    pool = mf.make_pool(tmp_path / "models", tasks, seed=2)
    data = {
        task: str(mf.make_test_set(tmp_path / "data" / task, task, size, pool[task], seed=30 + i))
        for i, (task, size) in enumerate(SIZES.items())
    }
    params = {"common_space_fraction": 0.5, "scaling_factor": 1.5}
    main([
        "test",
        "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.default_root_dir", str(tmp_path / "root"), *mf.QUIET, *mf.FLOAT64,
        "--data.tasks", json.dumps(list(tasks)), "--data.paths", json.dumps(data),
        "--data.processor", pool[mf.PRETRAINED], "--data.batch_size", "8", "--data.num_workers", "0",
        "--model", "lightning_modules.merged.MergedClassifier", "--model.report_dir", str(tmp_path / "report"),
        "--model.models", json.dumps(pool),
        "--model.method", "IsotropicCommonTask",
        "--model.method.common_space_fraction", "0.5", "--model.method.scaling_factor", "1.5",
    ])  # fmt: skip
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["method_name"] == "iso_cts" and report["hyperparameters"] == params
    ((label, row),) = report["rows"].items()
    assert label == "iso_cts(common_space_fraction=0.5, scaling_factor=1.5)"
    # The weights merge.py evaluated (the same code here, the same bits), against the formula; the
    # report against a float64 evaluation of them (merge.py ran in float64 too).
    merged = merge_backbone(ModelPool(pool), IsotropicCommonTask(**params), progress=False)
    pretrained = mf.backbone(mf.load_state(pool[mf.PRETRAINED]))
    expected = reference("iso_cts", params, pretrained, [mf.backbone(mf.load_state(pool[task])) for task in tasks])
    for key, tensor in expected.items():
        assert_within(merged[key], tensor, float64_results_bound(tensor), key)
    for task, size in SIZES.items():
        images, labels = mf.read_test_set(data[task])
        scores = mf.score(pool[task], images, labels, backbone_state=merged)
        assert row["tasks"][task]["num_samples"] == size
        mf.assert_scores(row["tasks"][task], scores, 8, task)
        own = mf.score(pool[task], images, labels)
        assert row["tasks"][task]["loss"] != pytest.approx(own.loss, rel=1e-3)  # the merge changed the model


# --- The decompositions: the Gram route, the SVD where it would lose accuracy, gesvd where gesdd fails ---


def spectrum_matrix(rows: int, columns: int, singular_values, seed: int) -> torch.Tensor:
    """``Q_1 diag(s) Q_2^T`` in float64 with random orthonormal ``Q``s: a matrix of known spectrum."""
    generator = torch.Generator().manual_seed(seed)
    rank = len(singular_values)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(columns, rank, generator=generator, dtype=torch.float64))[0]
    return left @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ right.T


def assert_triplets(matrix: torch.Tensor, u, s, vh, expected_values) -> None:
    """Orthonormal singular vectors that reproduce ``matrix``'s action: ``A^T u_i = s_i v_i``."""
    count = len(expected_values)
    eye = torch.eye(count, dtype=torch.float64)
    scale = float(expected_values[0])
    assert_within(s, torch.tensor(expected_values, dtype=torch.float64), FLOAT64_RTOL * scale)
    assert_within(u.T @ u, eye, FLOAT64_RTOL)
    assert_within(vh @ vh.T, eye, FLOAT64_RTOL)
    assert_within(matrix.T @ u, vh.T * s, FLOAT64_RTOL * scale)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_top_singular_takes_the_gram_route_where_the_spectrum_allows_and_the_svd_elsewhere(shape, monkeypatch):
    import merging.spectral as spectral

    calls = []
    real_svd = spectral.robust_svd
    monkeypatch.setattr(spectral, "robust_svd", lambda matrix: calls.append(matrix.shape) or real_svd(matrix))
    values = [10.0 - 0.5 * i for i in range(16)]
    matrix = spectrum_matrix(*shape, values, seed=1)
    assert_triplets(matrix, *top_singular(matrix, 4), values[:4])
    assert calls == []  # the Gram route
    # A used value below 2**-12 of the largest: the squared condition would exceed float32's range.
    values = [1.0, 0.5, 1e-5, *[1e-6] * 13]
    matrix = spectrum_matrix(*shape, values, seed=2)
    assert_triplets(matrix, *top_singular(matrix, 3), values[:3])
    assert calls == [shape]
    u, s, vh = top_singular(matrix, 0)
    assert (u.shape, s.shape, vh.shape) == ((shape[0], 0), (0,), (0, shape[1]))


def test_a_rank_deficient_residual_gives_orthonormal_top_triplets():
    """Iso-CTS's residual, a task matrix with the common subspace projected out: rank 4 of 12, so
    a fifth component is asked of a zero singular value (the SVD then, not the Gram route)."""
    matrix = spectrum_matrix(40, 12, [4.0, 3.0, 2.0, 1.0], seed=3)
    u, s, vh = top_singular(matrix, 5)
    assert_within(s[:4], torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), FLOAT64_RTOL * 4)
    assert float(s[4]) <= FLOAT64_RTOL * 4
    assert_within(u.T @ u, torch.eye(5, dtype=torch.float64), FLOAT64_RTOL)
    assert_within(vh @ vh.T, torch.eye(5, dtype=torch.float64), FLOAT64_RTOL)


def test_the_polar_factor_takes_the_svd_for_an_ill_conditioned_matrix(monkeypatch):
    import merging.spectral as spectral

    calls = []
    real_svd = spectral.robust_svd
    monkeypatch.setattr(spectral, "robust_svd", lambda matrix: calls.append(matrix.shape) or real_svd(matrix))
    for values, route in (([3.0, 2.0, 1.0], []), ([1.0, 1e-3, 1e-5], [(30, 3)])):
        matrix = spectrum_matrix(30, 3, values, seed=4)
        polar, spectrum = polar_and_spectrum(matrix)
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        assert_within(polar, u @ vh, FLOAT64_RTOL * math.sqrt(3))
        assert_within(spectrum, torch.tensor(values, dtype=torch.float64), FLOAT64_RTOL * values[0])
        assert calls == route


def test_an_svd_that_gesdd_cannot_converge_on_is_taken_from_gesvd(monkeypatch):
    """LAPACK's divide and conquer fails on some rank-deficient or ill-conditioned matrices (it did
    on Iso-CTS residuals of base-sized checkpoints on one machine; this machine's MKL converges on
    every such matrix tried here, so the failure is made): the QR-iteration driver then answers,
    and where both fail the merge stops with one error naming the matrix."""
    import merging.spectral as spectral

    def no_convergence(matrix, full_matrices=True):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned")

    matrix = spectrum_matrix(20, 6, [5.0, 4.0, 3.0, 0.0, 0.0, 0.0], seed=5)  # rank-deficient, repeated zeros
    monkeypatch.setattr(torch.linalg, "svd", no_convergence)
    u, s, vh = spectral.robust_svd(matrix)
    assert_triplets(matrix, u[:, :3], s[:3], vh[:3], [5.0, 4.0, 3.0])
    # The whole merge goes through: Iso-CTS on rank-1 task matrices, whose residuals outside the
    # common subspace (2 dimensions) have rank 1 where 2 components are asked of each.
    gesvd_calls = []
    real_gesvd = spectral.scipy.linalg.svd
    monkeypatch.setattr(spectral.scipy.linalg, "svd", lambda *a, **k: gesvd_calls.append(1) or real_gesvd(*a, **k))
    taus = [t(spectrum_matrix(20, 6, [2.0 + i], seed=6 + i).tolist()) for i in range(2)]
    merged = iso_cts(torch.zeros(20, 6), taus, 0.5, 1.0)
    assert torch.isfinite(merged).all() and gesvd_calls
    monkeypatch.setattr(
        spectral.scipy.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(np.linalg.LinAlgError("SVD did not converge"))
    )
    with pytest.raises(MergeError, match=r"the SVD of a \(20, 6\) matrix failed to converge with gesdd .* and gesvd"):
        spectral.robust_svd(matrix)
