"""Merge methods: exact values on hand-built tensors, properties, and the streaming engine
against the formulas applied to fully loaded state dicts.

The expected values are computed here from the papers' formulas (plain Python loops for the
hand-built tensors, whole-state-dict tensors in ``merge_fixtures`` for the engine), never with
the helpers of ``merging.methods``.
"""

from __future__ import annotations

import pytest
import torch

import merge_fixtures as mf
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.methods import (
    METHODS,
    DareTaskArithmetic,
    DareTies,
    SimpleAverage,
    TaskArithmetic,
    TiesMerging,
    dare,
    dare_generator,
    magnitude_threshold,
    simple_average,
    task_arithmetic,
    ties_merging,
)
from merging.pool import ModelPool
from tolerances import assert_within, linear_merge_bound, rounded_once

# Three tasks; each task vector spans two "parameters" (a 2x3 and a 4-vector), so the TIES
# threshold is over 10 numbers. All values are multiples of 1/8: every sum is exact.
PRETRAINED = {"a": [[0.5, -1.0, 2.0], [0.0, 1.5, -0.25]], "b": [1.0, -2.0, 0.125, 3.0]}
TASK_VECTORS = [
    {"a": [[1.0, -0.5, 0.25], [2.0, 0.0, -0.75]], "b": [0.5, -1.5, 0.125, 0.25]},
    {"a": [[-1.0, -0.25, 0.5], [1.0, 0.75, 0.25]], "b": [-0.5, 1.5, -2.0, 0.125]},
    {"a": [[0.5, -0.75, -0.5], [0.25, -1.0, 0.5]], "b": [1.0, 0.25, -0.125, -0.5]},
]


def flat(value) -> list[float]:
    return [x for row in value for x in row] if isinstance(value[0], list) else list(value)


def tensors(values: dict) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value, dtype=torch.float32) for key, value in values.items()}


def as_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(torch.float32).reshape(like.shape)


# --- The formulas, element by element -------------------------------------------------------


def kth_largest_magnitude(task_vector: dict, top_k: float) -> float:
    """The TIES authors' threshold (FusionBench's copy): ``kthvalue(|tau|, n - k)``, the
    ``(k + 1)``-th largest magnitude, ``k = int(top_k * n)``; 0 (keep all) where ``k = n``."""
    magnitudes = sorted((abs(x) for value in task_vector.values() for x in flat(value)), reverse=True)
    k = int(top_k * len(magnitudes))
    return 0.0 if k >= len(magnitudes) else magnitudes[k]


def ties_entry(values: list[float], thresholds: list[float]) -> float:
    trimmed = [v if abs(v) >= t else 0.0 for v, t in zip(values, thresholds)]
    total = sum(trimmed)
    if total == 0:
        return 0.0
    agreeing = [v for v in trimmed if v != 0 and (v > 0) == (total > 0)]
    return sum(agreeing) / len(agreeing)


# --- Exact values on hand-built tensors ------------------------------------------------------


def finetuned_values() -> list[dict[str, list[float]]]:
    """theta_t = theta_0 + tau_t for the three tasks, then theta_0 itself as a fourth model."""
    models = [{key: [p + v for p, v in zip(flat(PRETRAINED[key]), flat(tau[key]))] for key in PRETRAINED} for tau in TASK_VECTORS]
    return models + [{key: flat(PRETRAINED[key]) for key in PRETRAINED}]


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_simple_average_exact(count):
    models = finetuned_values()[:count]
    for key in PRETRAINED:
        expected = [sum(values) / len(values) for values in zip(*(model[key] for model in models))]
        result = simple_average(torch.tensor(model[key]) for model in models)
        assert result.dtype == torch.float32
        assert torch.equal(result, torch.tensor(expected, dtype=torch.float32)), key


@pytest.mark.parametrize("scaling_factor", [1.0, 0.5, 0.3])
def test_task_arithmetic_exact(scaling_factor):
    for key, pretrained in tensors(PRETRAINED).items():
        vectors = [tensors(task)[key] for task in TASK_VECTORS]
        expected = [
            p + scaling_factor * sum(values)
            for p, values in zip(flat(PRETRAINED[key]), zip(*(flat(task[key]) for task in TASK_VECTORS)))
        ]
        result = task_arithmetic(pretrained, iter(vectors), scaling_factor)
        if scaling_factor in (1.0, 0.5):  # every step exact in float32
            assert torch.equal(result, as_tensor(expected, pretrained)), key
        else:  # lambda = 0.3 is not a binary fraction: float32 rounding only, against the exact value rounded once
            vectors_and_base = linear_merge_bound(pretrained, vectors, scaling_factor) / 2  # one evaluation, not two
            exact = as_tensor(expected, pretrained)
            assert_within(result, exact, vectors_and_base + rounded_once(exact), key)


@pytest.mark.parametrize("top_k", [0.05, 0.1, 0.3, 0.5, 0.8, 1.0])
def test_ties_threshold_is_kth_largest_magnitude_of_the_whole_task_vector(top_k):
    for task in TASK_VECTORS:
        threshold = magnitude_threshold(iter(tensors(task).values()), top_k)
        expected = kth_largest_magnitude(task, top_k)
        if int(top_k * 10) >= 10:
            assert threshold == 0.0  # keeps everything, as documented
        else:
            assert threshold == expected


@pytest.mark.parametrize("top_k", [0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("scaling_factor", [1.0, 0.5])
def test_ties_exact(top_k, scaling_factor):
    thresholds = [kth_largest_magnitude(task, top_k) for task in TASK_VECTORS]
    module_thresholds = [magnitude_threshold(iter(tensors(task).values()), top_k) for task in TASK_VECTORS]
    for key, pretrained in tensors(PRETRAINED).items():
        columns = list(zip(*(flat(task[key]) for task in TASK_VECTORS)))
        expected = [
            p + scaling_factor * ties_entry(list(values), thresholds) for p, values in zip(flat(PRETRAINED[key]), columns)
        ]
        vectors = (tensors(task)[key] for task in TASK_VECTORS)
        result = ties_merging(pretrained, vectors, module_thresholds, scaling_factor)
        assert torch.equal(result, as_tensor(expected, pretrained)), (key, result, expected)


def test_ties_hand_built_data_covers_the_hard_cases():
    """The data above has: a tie at a threshold, an entry whose trimmed sum is 0, and an entry
    where the sign with more mass is the sign of fewer tasks (mass, not votes, elects)."""
    thresholds = [kth_largest_magnitude(task, 0.5) for task in TASK_VECTORS]
    columns = [list(values) for key in PRETRAINED for values in zip(*(flat(task[key]) for task in TASK_VECTORS))]
    trimmed = [[v if abs(v) >= t else 0.0 for v, t in zip(column, thresholds)] for column in columns]
    assert any(abs(v) == t for column in columns for v, t in zip(column, thresholds))
    assert any(sum(c) == 0 and any(c) for c in trimmed)
    assert any(sum(c) < 0 and sum(v > 0 for v in c) >= sum(v < 0 for v in c) for c in trimmed)
    # One hand-derived value: b[1] has trimmed values -1.5, +1.5, 0 -> sum 0 -> theta_0 unchanged.
    result = ties_merging(
        tensors(PRETRAINED)["b"],
        (tensors(task)["b"] for task in TASK_VECTORS),
        [magnitude_threshold(iter(tensors(task).values()), 0.5) for task in TASK_VECTORS],
        0.5,
    )
    assert result[1].item() == PRETRAINED["b"][1]


def test_ties_zero_magnitude_entries_never_vote():
    """top_k = 1 keeps everything, yet an entry with tau = 0 in every task stays theta_0, and a
    zero does not count in the disjoint mean's denominator."""
    pretrained = torch.tensor([1.0, 2.0])
    vectors = [torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.5])]
    result = ties_merging(pretrained, iter(vectors), [0.0, 0.0, 0.0], 1.0)
    assert torch.equal(result, torch.tensor([1.0, 2.0 + (0.5 + 1.5) / 2]))


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_against_the_seeded_generator(drop_rate, rescale):
    generator = torch.Generator().manual_seed(7)
    tau = torch.randn(64, 33, generator=generator)
    tau[tau == 0] = 1.0  # every entry non-zero: a zero in the output means "dropped"
    result = dare(tau, drop_rate, rescale, dare_generator(3, 1, "convnext.layer.weight"))
    keep = torch.rand(tau.shape, generator=dare_generator(3, 1, "convnext.layer.weight")) >= drop_rate
    kept = tau / (1 - drop_rate) if rescale else tau
    assert torch.equal(result[keep], kept[keep])
    assert torch.equal(result[~keep], torch.zeros(int((~keep).sum())))
    assert 0 < int(keep.sum()) < tau.numel()


@pytest.mark.parametrize("drop_rate", [0.2, 0.9])
def test_dare_drop_fraction_is_near_p(drop_rate):
    tau = torch.ones(400_000)
    result = dare(tau, drop_rate, True, dare_generator(0, 0, "key"))
    fraction = (result == 0).double().mean().item()
    assert abs(fraction - drop_rate) < 0.005  # ~6 standard deviations
    assert torch.equal(result.unique(), torch.tensor([0.0, 1 / (1 - drop_rate)], dtype=torch.float32))


def test_dare_masks_depend_on_seed_task_and_key_only():
    tau = torch.ones(10_000)

    def mask(seed, task, key):
        return dare(tau, 0.5, True, dare_generator(seed, task, key)) != 0

    reference = mask(0, 1, "convnext.a")
    assert torch.equal(reference, mask(0, 1, "convnext.a"))  # reproducible, whatever came before
    for other in [mask(0, 2, "convnext.a"), mask(0, 1, "convnext.b"), mask(1, 1, "convnext.a")]:
        assert not torch.equal(reference, other)
        # independent masks agree on about half the entries, not on nearly all of them
        assert (reference == other).double().mean().item() < 0.6


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_dare_rejects_drop_rates_outside_0_1(bad):
    with pytest.raises(MergeError, match="drop_rate"):
        dare(torch.ones(3), bad, True, dare_generator(0, 0, "k"))
    with pytest.raises(MergeError, match="drop_rate"):
        DareTies(drop_rate=bad, top_k=0.2, scaling_factor=0.3)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01])
def test_ties_rejects_top_k_outside_0_1(bad):
    with pytest.raises(MergeError, match="top_k"):
        TiesMerging(top_k=bad, scaling_factor=0.3)
    with pytest.raises(MergeError, match="top_k"):
        magnitude_threshold(iter([torch.ones(3)]), bad)


def test_methods_are_registered_by_name():
    classes = (SimpleAverage, TaskArithmetic, TiesMerging, DareTaskArithmetic, DareTies)
    names = ["simple_average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"]
    assert [cls.name for cls in classes] == names
    assert all(METHODS[name] is cls for name, cls in zip(names, classes))
    assert (
        DareTies(drop_rate=0.5, top_k=0.2, scaling_factor=0.3).describe()
        == "dare_ties(drop_rate=0.5, rescale=True, seed=0, top_k=0.2, scaling_factor=0.3)"
    )


# --- Properties -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 8])
def test_simple_average_of_identical_models_is_the_model(count):
    theta = torch.randn(50_000, generator=torch.Generator().manual_seed(count)) * 3
    assert torch.equal(simple_average([theta] * count), theta)


def test_ties_with_everything_kept_and_one_model_is_task_arithmetic():
    generator = torch.Generator().manual_seed(1)
    pretrained, tau = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator)
    threshold = magnitude_threshold(iter([tau]), 1.0)
    for scaling_factor in (0.3, 1.0, 0.7):
        assert torch.equal(
            ties_merging(pretrained, iter([tau]), [threshold], scaling_factor),
            task_arithmetic(pretrained, iter([tau]), scaling_factor),
        )


def test_dare_with_drop_rate_zero_is_the_identity():
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(dare(tau, 0.0, True, dare_generator(0, 0, "k")), tau)


# --- The streaming engine against the formulas on fully loaded checkpoints ------------------

TASKS = ("eurosat", "dtd", "mnist")


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("pool"), TASKS)


@pytest.fixture(scope="module")
def states(pool_dirs):
    pretrained = mf.backbone(mf.load_state(pool_dirs[mf.PRETRAINED]))
    finetuned = [mf.backbone(mf.load_state(pool_dirs[task])) for task in TASKS]
    return pretrained, finetuned


def run_engine(pool_dirs: dict[str, str], method) -> dict[str, torch.Tensor]:
    return merge_backbone(ModelPool(pool_dirs), method, progress=False)


METHOD_CASES = [
    (SimpleAverage, {}),
    (TaskArithmetic, {"scaling_factor": 0.3}),
    (TaskArithmetic, {"scaling_factor": 1.0}),
    (TiesMerging, {"top_k": 0.2, "scaling_factor": 0.3}),
    (TiesMerging, {"top_k": 0.75, "scaling_factor": 1.0}),
    (DareTaskArithmetic, {"drop_rate": 0.5, "seed": 3, "scaling_factor": 0.4}),
    (DareTies, {"drop_rate": 0.3, "seed": 0, "top_k": 0.2, "scaling_factor": 0.3}),
]


@pytest.mark.parametrize("cls, params", METHOD_CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_engine_equals_the_formula_on_loaded_state_dicts(pool_dirs, states, cls, params):
    pretrained, finetuned = states
    merged = run_engine(pool_dirs, cls(**params))
    assert list(merged) == list(pretrained)  # every backbone key, nothing else
    mf.assert_merge_matches(merged, cls.name, params, pretrained, finetuned)
    assert all(not torch.equal(merged[key], tensor) for key, tensor in pretrained.items())  # the merge moved every tensor


def test_engine_simple_average_of_identical_models_is_the_model(pool_dirs, states):
    same = pool_dirs["eurosat"]
    merged = run_engine({mf.PRETRAINED: pool_dirs[mf.PRETRAINED], "eurosat": same, "dtd": same, "mnist": same}, SimpleAverage())
    for key, tensor in states[1][0].items():
        assert torch.equal(merged[key], tensor), key


@pytest.mark.parametrize("scaling_factor", [0.3, 1.0])
def test_engine_ties_top_k_1_one_model_is_task_arithmetic(pool_dirs, scaling_factor):
    single = {mf.PRETRAINED: pool_dirs[mf.PRETRAINED], "dtd": pool_dirs["dtd"]}
    ties = run_engine(single, TiesMerging(top_k=1.0, scaling_factor=scaling_factor))
    arithmetic = run_engine(single, TaskArithmetic(scaling_factor=scaling_factor))
    for key in ties:
        assert torch.equal(ties[key], arithmetic[key]), key


@pytest.mark.parametrize(
    "with_dare, without",
    [
        (DareTaskArithmetic(drop_rate=0.0, seed=5, scaling_factor=0.3), TaskArithmetic(scaling_factor=0.3)),
        (DareTies(drop_rate=0.0, seed=5, top_k=0.2, scaling_factor=0.3), TiesMerging(top_k=0.2, scaling_factor=0.3)),
    ],
    ids=["task_arithmetic", "ties"],
)
def test_engine_dare_with_drop_rate_zero_is_the_method_without_dare(pool_dirs, with_dare, without):
    a, b = run_engine(pool_dirs, with_dare), run_engine(pool_dirs, without)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_engine_dare_masks_do_not_depend_on_the_pool_order(pool_dirs, states):
    """Same (seed, task index, key) -> same mask: reordering keys' processing changes nothing,
    and another seed gives another merge."""
    method = dict(drop_rate=0.5, seed=1, scaling_factor=0.3)
    first, again = run_engine(pool_dirs, DareTaskArithmetic(**method)), run_engine(pool_dirs, DareTaskArithmetic(**method))
    other = run_engine(pool_dirs, DareTaskArithmetic(**{**method, "seed": 2}))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_engine_keeps_the_pretrained_dtype(tmp_path):
    """A bfloat16 pool merges in float32 and is stored back in bfloat16."""
    pretrained = mf.make_pretrained(tmp_path / "pre")
    finetuned = mf.make_finetuned(pretrained, tmp_path / "ft", "eurosat", seed=1)
    for directory in (pretrained, finetuned):
        model = mf.ConvNextForImageClassification.from_pretrained(directory, dtype=torch.bfloat16)
        model.save_pretrained(directory)
    merged = run_engine({mf.PRETRAINED: str(pretrained), "eurosat": str(finetuned)}, TaskArithmetic(0.5))
    pre, ft = mf.backbone(mf.load_state(pretrained)), mf.backbone(mf.load_state(finetuned))
    for key, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        expected = (pre[key].float() + 0.5 * (ft[key].float() - pre[key].float())).to(torch.bfloat16)
        assert torch.equal(tensor, expected), key
