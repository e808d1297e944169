"""The data-free methods of their own modules (Model Stock, MagMax, WUDI, CART): exact values on
hand-built tensors, the rules for non-matrix parameters, the streaming engine against the
formulas on loaded checkpoints, ``merge.py test --model.method <Name>``, and bad input.

The expected values are worked out by hand (exact in binary where the text says so) or
computed here from the papers' formulas in float64 on whole tensors (WUDI: the paper's loss
differentiated by autograd, and torch's Adam), never with the helpers of the modules under
test; the one exception is WUDI's float32 run through the engine, checked against its own
function on whole tensors, the same bits. A result the project computes in float64 and rounds
once is compared within ``float64_results_bound``; one it computes in float32 entry by entry
with the same operations as the formula is compared bit for bit.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import merge_fixtures as mf
import test_bad_input
from merge import main
from merging import CART, METHODS, MagMax, ModelStock, WUDIMerging
from merging.cart import cart_merge, cart_rank
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.magmax import mag_max
from merging.model_stock import model_stock
from merging.pool import ModelPool
from merging.saved import load_merged
from merging.wudi import wudi_merge
from tolerances import assert_within, float64_results_bound

pytestmark = pytest.mark.usefixtures("one_thread")
workdir = test_bad_input.workdir  # an empty working directory, where whatever a failed run writes shows


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(result: torch.Tensor, expected) -> None:
    """``result`` (computed in float64, rounded to float32) against an exact or float64 ``expected``."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert result.dtype == torch.float32 and result.shape == expected.shape
    assert_within(result, expected, float64_results_bound(expected))


def random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def one_buffer(vectors):
    """A stream that reuses one tensor, as the engine's reader with its scratch buffer does."""
    buffer = torch.empty_like(vectors[0])
    for vector in vectors:
        buffer.copy_(vector)
        yield buffer


# --- Model Stock ----------------------------------------------------------------------------


def reference_model_stock(pretrained: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """The paper's ratio with the mean pairwise angle, in float64 on whole tensors."""
    flat = [tau.double().reshape(-1) for tau in taus]
    angles = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            cosine = torch.dot(flat[i], flat[j]) / (flat[i].norm() * flat[j].norm())
            angles.append(torch.arccos(cosine.clamp(-1, 1)))
    cosine = torch.cos(torch.stack(angles).mean())
    count = len(taus)
    ratio = count * cosine / (1 + (count - 1) * cosine)
    return pretrained.double() + ratio * torch.stack([tau.double() for tau in taus]).mean(0)


THETA0 = [0.5, -1.0, 2.0]


def test_model_stock_two_tasks_at_the_3_4_5_angle():
    # cos = (5*3) / (5*5) = 0.6, t = 2 * 0.6 / 1.6 = 0.75; mean tau = (4, 2, 0): theta_0 + (3, 1.5, 0).
    close(model_stock(t(THETA0), [t([5.0, 0.0, 0.0]), t([3.0, 4.0, 0.0])]), [3.5, 0.5, 2.0])


def test_model_stock_orthogonal_task_vectors_give_the_pretrained_model():
    close(model_stock(t(THETA0), [t([1.0, 0.0, 0.0]), t([0.0, -2.0, 0.0])]), THETA0)


def test_model_stock_parallel_task_vectors_give_their_average():
    # cos = 1: t = T / T = 1, whatever the lengths.
    close(model_stock(t(THETA0), [t([1.0, 2.0, 0.0]), t([3.0, 6.0, 0.0]), t([0.5, 1.0, 0.0])]), [2.0, 2.0, 2.0])


def test_model_stock_averages_the_pairwise_angles_not_their_cosines():
    # Angles 90, 45, 45 degrees: mean 60, cos 0.5, t = 3 * 0.5 / (1 + 2 * 0.5) = 0.75 (the mean of
    # the cosines, 0.4714, would give 0.7279); mean tau = (2/3, 2/3, 0): theta_0 + (0.5, 0.5, 0).
    result = model_stock(t(THETA0), [t([1.0, 0.0, 0.0]), t([0.0, 1.0, 0.0]), t([1.0, 1.0, 0.0])])
    close(result, [1.0, -0.5, 2.0])


def test_model_stock_a_zero_task_vector_meets_the_others_at_a_right_angle():
    # Pairs with the zero vector: 90 degrees; the other pair: 0. Mean 60: t = 0.75 as above,
    # mean tau = (2, 0, 0) / 3.
    close(model_stock(t(THETA0), [t([0.0, 0.0, 0.0]), t([1.0, 0.0, 0.0]), t([1.0, 0.0, 0.0])]), [1.0, -1.0, 2.0])


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 2, 2), (7,)])
def test_model_stock_takes_one_angle_over_every_entry_of_a_tensor(shape):
    pretrained = random(shape, 0)
    taus = [random(shape, seed) + 0.5 for seed in (1, 2, 3, 4)]  # a shared direction: cos well above 0
    expected = reference_model_stock(pretrained, taus)
    close(model_stock(pretrained, taus), expected)
    assert torch.equal(model_stock(pretrained, one_buffer(taus)), model_stock(pretrained, taus))


def test_model_stock_needs_two_fine_tuned_models():
    with pytest.raises(MergeError, match="Model Stock needs at least two fine-tuned models .*, got 1"):
        model_stock(t(THETA0), [t([1.0, 0.0, 0.0])])
    with pytest.raises(MergeError, match="got 1"):
        ModelStock().prepare(["dtd"], ["convnext.x"])


# --- MagMax ---------------------------------------------------------------------------------


def reference_mag_max(pretrained: torch.Tensor, taus: list[torch.Tensor], scaling_factor: float) -> torch.Tensor:
    """Entry by entry the task vector of largest magnitude, the last of equal ones, in float32 with
    the formula's two operations (``theta_0 + lambda * tau``): the project's result to the bit."""
    stacked = torch.stack(taus)
    magnitudes = stacked.abs()
    # the last index of the maximum: argmax of the reversed stack, counted from the end
    last = len(taus) - 1 - magnitudes.flip(0).argmax(dim=0)
    return pretrained + scaling_factor * stacked.gather(0, last.unsqueeze(0)).squeeze(0)


def test_mag_max_takes_the_largest_magnitude_entry_by_entry_and_the_later_task_on_a_tie():
    # Entry 0: |-2| of task 1; entry 1: |-3| of task 0; entry 2: |-0.75| of task 2; entry 3: 2, -2
    # and 1, a tie of tasks 0 and 1 that task 1 (-2) wins. Halved and added: exact in binary.
    taus = [t([1.0, -3.0, 0.5, 2.0]), t([-2.0, 1.0, 0.25, -2.0]), t([0.5, 2.5, -0.75, 1.0])]
    expected = t([-0.5, -2.5, 1.625, -1.0])
    assert torch.equal(mag_max(t([0.5, -1.0, 2.0, 0.0]), taus, scaling_factor=0.5), expected)
    assert torch.equal(mag_max(t([0.5, -1.0, 2.0, 0.0]), one_buffer(taus), scaling_factor=0.5), expected)
    # Task 1 last: the tie of entry 3 goes to task 0 (+2) instead.
    reordered = [taus[1], taus[2], taus[0]]
    assert torch.equal(mag_max(t([0.5, -1.0, 2.0, 0.0]), reordered, scaling_factor=0.5), t([-0.5, -2.5, 1.625, 1.0]))


def test_mag_max_of_one_task_is_task_arithmetic():
    tau = random((5, 3), 1)
    assert torch.equal(mag_max(random((5, 3), 0), [tau], scaling_factor=0.7), random((5, 3), 0) + 0.7 * tau)


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 2, 2), (7,)])
def test_mag_max_against_the_formula(shape):
    pretrained, taus = random(shape, 0), [random(shape, seed) for seed in (1, 2, 3, 4, 5)]
    assert torch.equal(mag_max(pretrained, taus, scaling_factor=0.3), reference_mag_max(pretrained, taus, 0.3))


def test_mag_max_is_elementwise_and_needs_its_scaling_factor():
    assert MagMax.elementwise and MagMax.uses_pretrained and not MagMax.propagates_non_finite
    assert MagMax(scaling_factor=0.5).describe() == "mag_max(scaling_factor=0.5)"
    with pytest.raises(TypeError, match="scaling_factor"):
        MagMax()
    with pytest.raises(MergeError, match="no fine-tuned model"):
        mag_max(t([1.0]), [], scaling_factor=1.0)


# --- WUDI-Merging ---------------------------------------------------------------------------


def reference_wudi(pretrained: torch.Tensor, taus: list[torch.Tensor], iter_num: int, lr: float) -> torch.Tensor:
    """The paper's loss as written, differentiated by autograd, and torch's Adam, in float64
    (FusionBench's ``wudi_merging``, transcribed)."""
    stacked = torch.stack([tau.double() for tau in taus])
    merged = torch.nn.Parameter(stacked.sum(0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    squared_norms = stacked.flatten(1).norm(dim=1) ** 2
    for _ in range(iter_num):
        products = (merged.unsqueeze(0) - stacked) @ stacked.transpose(1, 2)
        loss = (products.square().sum((1, 2)) / squared_norms).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return pretrained.double() + merged.detach()


def test_wudi_orthogonal_task_vectors_do_not_interfere_and_stay_summed():
    # Rows (and columns) orthogonal: (tau_m - tau_t) tau_t^T = 0 at tau_m = tau_1 + tau_2, the gradient
    # is 0 and Adam does not move (0 / (0 + eps)).
    taus = [t([[1.0, 0.0], [0.0, 0.0]]), t([[0.0, 0.0], [0.0, 2.0]])]
    result = wudi_merge(t([[0.5, 0.5], [0.5, 0.5]]), taus, iter_num=5, lr=0.25, device=torch.device("cpu"))
    assert torch.equal(result, t([[1.5, 0.5], [0.5, 2.5]]))


def test_wudi_one_adam_step_by_hand():
    # tau_1 = (1, 0), tau_2 = (1, 1) (1 x 2): G_1 = [[1, 0], [0, 0]], G_2 = [[1, 1], [1, 1]] / 2, at
    # tau_m = (2, 1) the gradient 2 sum_t (tau_m - tau_t) G_t = 2 ((1, 1) G_1 + (1, 0) G_2) = (3, 1); Adam's
    # first step is lr g / (|g| + eps).
    result = wudi_merge(t([[0.0, 0.0]]), [t([[1.0, 0.0]]), t([[1.0, 1.0]])], iter_num=1, lr=0.25, dtype=torch.float64)
    close(result, [[2 - 0.25 * 3 / (3 + 1e-8), 1 - 0.25 * 1 / (1 + 1e-8)]])


@pytest.mark.parametrize("shape", [(6, 4), (3, 8)])
def test_wudi_closed_form_gradient_takes_the_steps_of_autograd_on_the_papers_loss(shape):
    pretrained = random(shape, 0)
    taus = [random(shape, seed) * 0.1 for seed in (1, 2, 3)] + [torch.zeros(shape)]  # a zero task vector adds nothing
    expected = reference_wudi(pretrained, taus[:3], iter_num=20, lr=1e-2)
    close(wudi_merge(pretrained, taus, iter_num=20, lr=1e-2, dtype=torch.float64), expected)
    close(wudi_merge(pretrained, one_buffer(taus), iter_num=20, lr=1e-2, dtype=torch.float64), expected)
    assert (expected - reference_wudi(pretrained, taus[:3], iter_num=0, lr=1e-2)).abs().max() > 1e-2  # the steps moved it


def test_wudi_without_steps_is_the_sum_and_other_tensors_get_the_mean_task_vector():
    pretrained, taus = random((5, 3), 0), [random((5, 3), seed) for seed in (1, 2)]
    close(wudi_merge(pretrained, taus, iter_num=0), pretrained.double() + taus[0].double() + taus[1].double())
    # Not a matrix: theta_0 + (1/T) sum_t tau_t, whatever iter_num.
    close(wudi_merge(t([1.0, -2.0]), [t([0.5, 1.0]), t([1.5, -3.0])], iter_num=7), [2.0, -3.0])
    conv = random((2, 1, 3, 3), 3)
    close(wudi_merge(conv, [2 * conv, -4 * conv], iter_num=7), conv.double() * 0)  # powers of two: exact


def test_wudi_options_are_checked_up_front():
    assert WUDIMerging(iter_num=300).describe() == "wudi(iter_num=300, lr=1e-05)"
    for bad in (-1, 1.5, True):
        with pytest.raises(MergeError, match=f"iter_num must be an integer >= 0, got {bad}"):
            WUDIMerging(iter_num=bad)
    for bad in (0.0, -1e-5, math.nan, math.inf):
        with pytest.raises(MergeError, match="lr must be a finite number > 0"):
            WUDIMerging(iter_num=1, lr=bad)


# --- CART -----------------------------------------------------------------------------------


def reference_cart(pretrained: torch.Tensor, taus: list[torch.Tensor], rank_ratio: float, scaling_factor: float):
    """The authors' static CART merge, in float64 with full SVDs (``torch.linalg.svd``)."""
    average = pretrained.double() + torch.stack([tau.double() for tau in taus]).mean(0)
    if pretrained.ndim != 2:
        return average
    keep = 0 if rank_ratio == 0 else max(1, int(rank_ratio * min(pretrained.shape)))
    low_rank = torch.zeros_like(average)
    for tau in taus:
        u, s, vh = torch.linalg.svd(pretrained.double() + tau.double() - average, full_matrices=False)
        low_rank += (u[:, :keep] * s[:keep]) @ vh[:keep]
    return average + scaling_factor * low_rank


# tau_1 = diag(3, 0), tau_2 = diag(0, 3), tau_3 = diag(0, 1.5): the average diag(1, 1.5), the centered
# vectors diag(2, -1.5), diag(-1, 1.5) and diag(-1, 0), whose top components (k = 1) are diag(2, 0),
# diag(0, 1.5) and diag(-1, 0): their sum diag(1, 1.5), times lambda = 2, on the average: diag(3, 4.5).
CART_TAUS = [[[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]], [[0.0, 0.0], [0.0, 1.5]]]


def test_cart_by_hand_on_diagonal_matrices_and_rotated_ones():
    zero = torch.zeros(2, 2)
    close(cart_merge(zero, [t(tau) for tau in CART_TAUS], rank_ratio=0.5, scaling_factor=2.0), [[3.0, 0.0], [0.0, 4.5]])
    # Turned by a quarter on the left (exact in binary), every SVD turns with it: R diag(3, 4.5).
    quarter = t([[0.0, -1.0], [1.0, 0.0]])
    turned = [quarter @ t(tau) for tau in CART_TAUS]
    close(cart_merge(zero, turned, rank_ratio=0.5, scaling_factor=2.0), [[0.0, -4.5], [3.0, 0.0]])


@pytest.mark.parametrize(("rank", "ratio", "expected"), [(64, 0.12, 7), (8, 0.12, 1), (8, 0.0, 0), (8, 1.0, 8), (32, 0.32, 10)])
def test_cart_rank_is_the_authors(rank, ratio, expected):
    assert cart_rank(rank, ratio) == expected


@pytest.mark.parametrize("shape", [(6, 4), (3, 8)])
def test_cart_against_full_svds(shape):
    pretrained, taus = random(shape, 0), [random(shape, seed) for seed in (1, 2, 3, 4)]
    for rank_ratio, scaling_factor in [(0.34, 1.5), (0.5, 2.0), (0.0, 2.0)]:
        expected = reference_cart(pretrained, taus, rank_ratio, scaling_factor)
        close(cart_merge(pretrained, taus, rank_ratio, scaling_factor), expected)
        close(cart_merge(pretrained, one_buffer(taus), rank_ratio, scaling_factor), expected)
    average = pretrained.double() + torch.stack([tau.double() for tau in taus]).mean(0)
    assert (reference_cart(pretrained, taus, 0.34, 1.5) - average).abs().max() > 0.1  # the components count
    # The whole rank: the centered vectors sum to zero, and so does the sum of their full SVDs.
    close(cart_merge(pretrained, taus, 1.0, 2.0), average)


def test_cart_of_two_models_and_of_non_matrices_is_the_average():
    pretrained, taus = random((6, 4), 0), [random((6, 4), 1), random((6, 4), 2)]
    average = pretrained.double() + (taus[0].double() + taus[1].double()) / 2
    close(cart_merge(pretrained, taus, 0.5, 3.0), average)  # c_2 = -c_1: their top components cancel
    close(cart_merge(t([1.0, -2.0]), [t([0.5, 1.0]), t([1.5, -3.0]), t([1.0, -1.0])], 0.5, 2.0), [2.0, -3.0])


def test_cart_options_are_checked_up_front():
    assert CART(rank_ratio=0.12, scaling_factor=2.0).describe() == "cart(rank_ratio=0.12, scaling_factor=2)"
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(MergeError, match="rank_ratio must be in"):
            CART(rank_ratio=bad, scaling_factor=1.0)
    with pytest.raises(MergeError, match="scaling_factor must be a finite number"):
        CART(rank_ratio=0.1, scaling_factor=math.inf)


# --- Registration, the engine on loaded checkpoints, merge.py ------------------------------

TASKS = ("eurosat", "dtd", "mnist")
#: (class name, registry name, hyper-parameters, the reference of one tensor: computed in float64, or in
#: float32 with the project's own operations, where the result must be the same bits)
CASES = [
    ("ModelStock", "model_stock", {}, lambda p, taus, params: reference_model_stock(p, taus)),
    ("MagMax", "mag_max", {"scaling_factor": 0.6}, lambda p, taus, params: reference_mag_max(p, taus, **params)),
    # the function on whole tensors (its float64 steps are checked against autograd above): the engine
    # streams a matrix's task vectors into it in the same order, so the same bits
    ("WUDIMerging", "wudi", {"iter_num": 30, "lr": 1e-3}, lambda p, taus, params: wudi_merge(p, taus, **params)),
    ("CART", "cart", {"rank_ratio": 0.3, "scaling_factor": 1.5}, lambda p, taus, params: reference_cart(p, taus, **params)),
]


def test_methods_are_registered_and_described():
    for cls, name, params, _ in CASES:
        method = METHODS[name](**params)
        assert type(method).__name__ == cls and method.name == name
        assert method.describe() == name + (f"({', '.join(f'{k}={v:g}' for k, v in params.items())})" if params else "")
        assert "arXiv" in type(method).__doc__ + sys.modules[type(method).__module__].__doc__


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("pool"), TASKS)


@pytest.mark.parametrize("cls, name, params, reference", CASES, ids=[case[1] for case in CASES])
def test_engine_equals_the_formula_on_loaded_state_dicts(pool_dirs, cls, name, params, reference):
    pretrained = mf.backbone(mf.load_state(pool_dirs[mf.PRETRAINED]))
    finetuned = [mf.backbone(mf.load_state(pool_dirs[task])) for task in TASKS]
    merged = merge_backbone(ModelPool(pool_dirs), METHODS[name](**params), progress=False)
    assert list(merged) == list(pretrained)
    for key, theta0 in pretrained.items():
        expected = reference(theta0, [model[key] - theta0 for model in finetuned], params)
        assert merged[key].dtype == theta0.dtype and merged[key].shape == theta0.shape
        if expected.dtype == torch.float32:
            assert torch.equal(merged[key], expected), key
        else:
            assert_within(merged[key], expected, float64_results_bound(expected), key)
        assert not torch.equal(merged[key], theta0), key


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("datafree_cli")
    pool = mf.make_pool(root / "models", TASKS[:2], seed=4)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, 4, pool[task], seed=20 + i)) for i, task in enumerate(TASKS[:2])
    }
    return pool, data


@pytest.mark.parametrize("cls, name, params, reference", CASES, ids=[case[1] for case in CASES])
def test_merge_py_merges_and_saves_with_the_method(cli_setup, tmp_path, quiet_cli, cls, name, params, reference):
    pool, data = cli_setup
    saved = tmp_path / "saved"
    args = mf.merge_test_args(tmp_path, data, pool[mf.PRETRAINED], 4)
    args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps(pool)]
    args += ["--model.method", cls, *[item for key, value in params.items() for item in (f"--model.method.{key}", str(value))]]
    main([*args, "--model.save_dir", str(saved), "--trainer.limit_test_batches", "0"])
    model = load_merged(saved)
    # The same merge code on the same machine: the same bits.
    expected = merge_backbone(ModelPool(pool), METHODS[name](**params), progress=False)
    assert sorted(model.backbone) == sorted(expected)
    assert all(torch.equal(model.backbone[key], tensor) for key, tensor in expected.items())
    assert math.isfinite(sum(float(tensor.sum()) for tensor in expected.values()))


BAD_INPUT = {
    "Model Stock on one fine-tuned model": (
        ["--model.method", "ModelStock"], 1, "Model Stock needs at least two fine-tuned models (the angle between them), got 1"
    ),
    "a negative WUDI step count": (["--model.method", "WUDIMerging", "--model.method.iter_num", "-1"], 2,
                                   "iter_num must be an integer >= 0, got -1"),
    "a CART rank ratio above 1": (["--model.method", "CART", "--model.method.rank_ratio", "1.5",
                                   "--model.method.scaling_factor", "1"], 2, "rank_ratio must be in [0, 1], got 1.5"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_error_line_and_nothing_written(cli_setup, workdir, capsys, case):
    method, num_tasks, message = BAD_INPUT[case]
    pool, data = cli_setup
    tasks = TASKS[:num_tasks]
    models = {mf.PRETRAINED: pool[mf.PRETRAINED], **{task: pool[task] for task in tasks}}
    args = mf.merge_test_args(workdir, {task: data[task] for task in tasks}, pool[mf.PRETRAINED], 4)
    args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps(models), *method]
    args += ["--model.report_dir", str(workdir / "report")]
    test_bad_input.assert_contains(test_bad_input.one_error_line(main, args, capsys), message)
    assert not list(workdir.iterdir())
