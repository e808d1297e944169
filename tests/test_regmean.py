"""RegMean's pieces: the closed form on hand-written tensors, the Gram hooks on a tiny ConvNeXt,
the engine's handling of Gram matrices, and the DataModule's unlabelled ``gram`` split.

Expected values are worked out by hand or computed independently (NumPy least squares,
explicit inverses in float64), never with ``merging.regmean``'s own helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ConvNextModel

import merge_fixtures as mf
from conftest import index_dataset, tiny_config, write_dataset
from datamodules import DataError, MultiTaskDataModule, split_train_val
from datamodules.tasks import TASKS
from merging import METHODS, RegMean, SimpleAverage
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.grams import GramAccumulator, linear_layers
from merging.pool import ModelPool
from merging.regmean import regmean, shrink_off_diagonal
from tolerances import FLOAT64_RTOL, assert_within, float64_results_bound

pytestmark = pytest.mark.usefixtures("one_thread")


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def spd(size: int, seed: int) -> torch.Tensor:
    """A random symmetric positive-definite Gram: X^T X / N of 3 * size random rows."""
    rows = random((3 * size, size), seed)
    return rows.T @ rows / rows.shape[0]


# --- The closed form -------------------------------------------------------------------------


def test_identity_grams_give_the_simple_average():
    weights = [random((5, 4), seed) for seed in range(3)]
    merged = regmean(iter(weights), [torch.eye(4)] * 3, reduce_non_diagonal_ratio=0.7)
    expected = sum(weight.double() for weight in weights) / 3
    assert_within(merged, expected, float64_results_bound(expected))


def test_one_task_gives_its_own_weight():
    weight = random((6, 5), 1)
    for ratio in (1.0, 0.5, 0.0):
        assert_within(regmean(iter([weight]), [spd(5, 2)], ratio), weight, float64_results_bound(weight))


def test_diagonal_grams_weigh_each_input_feature_by_hand():
    # Column j of W* = sum_t G_t[j, j] W_t[:, j] / sum_t G_t[j, j]:
    # column 0: (1 * 1 + 3 * 3) / 4 = 2.5, column 1: (3 * 2 + 1 * -2) / 4 = 1.
    merged = regmean(iter([t([[1, 2]]), t([[3, -2]])]), [t([[1, 0], [0, 3]]), t([[3, 0], [0, 1]])], 1.0)
    assert merged.dtype == torch.float32
    assert_within(merged, t([[2.5, 1.0]]), float64_results_bound(t([[2.5, 1.0]])))


@pytest.mark.parametrize(
    "ratio, expected",
    [
        # sum G = [[3, 1], [1, 2]], its inverse [[2, -1], [-1, 3]] / 5, sum G W^T = [2, 2]: W* = [2, 4] / 5.
        (1.0, [[0.4, 0.8]]),
        # G~_1 = [[2, .5], [.5, 1]]: sum = [[3, .5], [.5, 2]] (det 5.75), sum G~ W^T = [2, 1.5]:
        # W* = [2 * 2 - .5 * 1.5, -.5 * 2 + 3 * 1.5] / 5.75 = [3.25, 3.5] / 5.75.
        (0.5, [[3.25 / 5.75, 3.5 / 5.75]]),
        # Diagonals only: column 0 (2 * 1 + 1 * 0) / 3, column 1 (1 * 0 + 1 * 1) / 2.
        (0.0, [[2 / 3, 0.5]]),
    ],
)
def test_a_non_diagonal_case_by_hand(ratio, expected):
    weights = [t([[1, 0]]), t([[0, 1]])]
    grams = [t([[2, 1], [1, 1]]), torch.eye(2)]
    exact = torch.tensor(expected, dtype=torch.float64)
    assert_within(regmean(iter(weights), grams, ratio), exact, float64_results_bound(exact))


def test_shrink_keeps_the_diagonal_and_scales_the_rest():
    gram = t([[4, 2, -1], [2, 5, 3], [-1, 3, 6]])
    original = gram.clone()
    torch.testing.assert_close(shrink_off_diagonal(gram, 0.25), t([[4, 0.5, -0.25], [0.5, 5, 0.75], [-0.25, 0.75, 6]]))
    assert torch.equal(gram, original), "the Gram given is not changed"


def test_ratio_one_is_the_least_squares_merge_of_the_layer_outputs():
    """``W*`` minimises ``sum_t ||X_t W^T - X_t W_t^T||^2 / N_t``: NumPy's least squares on the
    stacked, row-weighted inputs gives the same matrix (from the same float64 Grams: two float64
    computations of one solution, whose design matrix is well conditioned)."""
    inputs = [random((n, 6), 10 + n).double() for n in (9, 14, 30)]
    weights = [random((4, 6), 20 + i) for i in range(3)]
    grams = [x.T @ x / x.shape[0] for x in inputs]
    design = np.concatenate([x.numpy() / np.sqrt(x.shape[0]) for x in inputs])
    targets = np.concatenate([x.numpy() @ w.double().numpy().T / np.sqrt(x.shape[0]) for x, w in zip(inputs, weights)])
    expected = np.linalg.lstsq(design, targets, rcond=None)[0].T
    expected = torch.from_numpy(expected)
    assert_within(regmean(iter(weights), grams, 1.0), expected, float64_results_bound(expected))


def test_mismatched_inputs_are_errors():
    with pytest.raises(MergeError, match=r"shape \[3, 4\] needs a Gram of \[4, 4\], got \[3, 3\]"):
        regmean(iter([torch.ones(3, 4)]), [torch.eye(3)], 1.0)
    with pytest.raises(MergeError, match="1 weights for 2 Gram matrices"):
        regmean(iter([torch.ones(2, 2)]), [torch.eye(2)] * 2, 1.0)
    with pytest.raises(MergeError, match="more weights than the 1 Gram"):
        regmean(iter([torch.ones(2, 2)] * 2), [torch.eye(2)], 1.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(MergeError, match="reduce_non_diagonal_ratio must be in"):
            RegMean(reduce_non_diagonal_ratio=bad)


def test_regmean_is_registered_and_described():
    assert METHODS["regmean"] is RegMean
    assert RegMean(0.9).describe() == "regmean(reduce_non_diagonal_ratio=0.9)"
    assert RegMean.needs_grams and not SimpleAverage.needs_grams


# --- The Gram hooks --------------------------------------------------------------------------


def tiny_backbone(seed: int = 0) -> ConvNextModel:
    torch.manual_seed(seed)
    return ConvNextModel(mf.tiny_config()).eval()


def test_the_hooked_layers_are_every_blocks_pwconvs():
    backbone = ConvNextModel(tiny_config(depths=[1, 2, 1, 1]))
    expected = [
        f"convnext.encoder.stages.{stage}.layers.{layer}.{name}.weight"
        for stage, depth in enumerate([1, 2, 1, 1])
        for layer in range(depth)
        for name in ("pwconv1", "pwconv2")
    ]
    assert list(linear_layers(backbone)) == expected


def test_gram_sums_are_the_inputs_x_transpose_x_over_all_positions():
    """In float64 (the sums follow the backbone's dtype): the hooked forward of five images and
    the accumulator's two forwards of two and three are two float64 computations of the same
    inputs, so their Grams agree to ``FLOAT64_RTOL`` of ``|X|^T |X|``."""
    assert GramAccumulator(tiny_backbone()).dtype() == torch.float32
    backbone = tiny_backbone().double()
    images = random((5, 3, 32, 32), 3).double()
    # Independently: the inputs each pwconv sees, captured by a plain hook, flattened here.
    seen = {}
    handles = [
        module.register_forward_hook(lambda m, args, out, key=key: seen.setdefault(key, []).append(args[0].detach()))
        for key, module in linear_layers(backbone).items()
    ]
    with torch.no_grad():
        backbone(pixel_values=images)
    for handle in handles:
        handle.remove()
    accumulator = GramAccumulator(backbone)
    with torch.no_grad():
        accumulator(images[:2])
        accumulator(images[2:])  # two batches add up to one pass over all five images
    sums, rows, count = accumulator.reduced_sums(torch.device("cpu"))
    assert count == 5
    for key, total, num_rows in zip(accumulator.keys, sums, rows):
        (inputs,) = seen[key]
        flat = inputs.reshape(-1, inputs.shape[-1]).double()
        assert inputs.ndim == 4 and num_rows == flat.shape[0] == 5 * inputs.shape[1] * inputs.shape[2]
        assert total.dtype == torch.float64
        scale = torch.linalg.vector_norm(flat.abs().T @ flat.abs())
        assert_within(total, flat.T @ flat, FLOAT64_RTOL * scale, key)


# --- The engine with Gram matrices -----------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("regmean_pool"), ("eurosat", "dtd", "gtsrb"), seed=2)


def pool_grams(models: dict[str, str], seed: int) -> dict[str, list[torch.Tensor]]:
    """A random SPD Gram per task for every Linear weight of the pool's backbones."""
    state = mf.load_state(models[mf.PRETRAINED])
    keys = [key for key in state if key.endswith(("pwconv1.weight", "pwconv2.weight"))]
    return {key: [spd(state[key].shape[1], seed + 7 * i + k) for i in range(3)] for k, key in enumerate(keys)}


def test_merge_backbone_uses_the_grams_for_linear_weights_and_averages_the_rest(pool):
    grams = pool_grams(pool, seed=5)
    merged = merge_backbone(ModelPool(pool), RegMean(0.8), progress=False, grams=grams)
    finetuned = [mf.backbone(mf.load_state(pool[task])) for task in ("eurosat", "dtd", "gtsrb")]
    average = mf.reference_simple_average(finetuned)
    assert sorted(merged) == sorted(average)
    for key, tensor in merged.items():
        if key not in grams:
            torch.testing.assert_close(tensor, average[key], rtol=0, atol=0)
            continue
        # (sum_t G~_t)^-1 sum_t G~_t W_t^T with an explicit inverse, in float64.
        shrunk = [0.8 * g.double() + 0.2 * torch.diag(torch.diagonal(g.double())) for g in grams[key]]
        expected = (torch.linalg.inv(sum(shrunk)) @ sum(g @ m[key].double().T for g, m in zip(shrunk, finetuned))).T
        assert_within(tensor, expected, float64_results_bound(expected), key)
        assert not torch.allclose(tensor, average[key], atol=1e-3), key


def test_merge_backbone_refuses_regmean_without_grams_and_grams_for_others(pool):
    grams = pool_grams(pool, seed=1)
    with pytest.raises(MergeError, match="needs the Gram matrices.*data.gram_images"):
        merge_backbone(ModelPool(pool), RegMean(), progress=False)
    with pytest.raises(MergeError, match="merges without Gram matrices"):
        merge_backbone(ModelPool(pool), SimpleAverage(), progress=False, grams=grams)
    key = next(iter(grams))
    with pytest.raises(MergeError, match=f"'{key}' has 2 Gram matrices for 3 fine-tuned models"):
        merge_backbone(ModelPool(pool), RegMean(), progress=False, grams={**grams, key: grams[key][:2]})
    with pytest.raises(MergeError, match="keys the backbone lacks: convnext.nope.weight"):
        merge_backbone(ModelPool(pool), RegMean(), progress=False, grams={**grams, "convnext.nope.weight": []})


def test_a_singular_gram_sum_names_the_layer(pool):
    grams = pool_grams(pool, seed=3)
    key = next(iter(grams))
    zero = [torch.zeros_like(g) for g in grams[key]]
    with pytest.raises(MergeError, match=f"merging '{key}' with regmean.*singular"):
        merge_backbone(ModelPool(pool), RegMean(), progress=False, grams={**grams, key: zero})


# --- The DataModule's gram split -------------------------------------------------------------

SIZES = {"train": 60, "test": 9}
CLASSES = TASKS["dtd"].classnames[:4]


def test_the_gram_split_comes_first_unlabelled_and_seeded(tmp_path, tiny_processor, decode_index):
    path = write_dataset(index_dataset(SIZES, CLASSES), tmp_path / "dtd", "disk")
    data = MultiTaskDataModule(
        ["dtd"], paths={"dtd": path}, processor=tiny_processor, batch_size=7, num_workers=0, gram_images=20, gram_seed=4
    )
    assert data.splits == ["gram", "test"] and data.evaluated_splits == ["test"]
    assert data.gram_datasets["dtd"].data.column_names == ["image"], "no label column to read"
    gram, test = data.test_dataloader()
    batches = list(gram)
    assert all(isinstance(batch, torch.Tensor) for batch in batches), "images alone, no labels"
    rows = [decode_index(image) for batch in batches for image in batch]
    assert rows == sorted(np.random.default_rng(4).permutation(SIZES["train"])[:20].tolist())
    assert [decode_index(image) for batch in test for image in batch[0]] == list(range(SIZES["test"]))
    other_seed = MultiTaskDataModule(["dtd"], paths={"dtd": path}, processor=tiny_processor, gram_images=20, gram_seed=5)
    assert other_seed.gram_rows(SIZES["train"]).tolist() != rows


def test_gram_images_avoid_the_validation_rows_and_are_capped_by_the_train_split(tmp_path, tiny_processor):
    path = write_dataset(index_dataset(SIZES, CLASSES), tmp_path / "dtd", "disk")
    data = MultiTaskDataModule(
        ["dtd"], paths={"dtd": path}, processor=tiny_processor, gram_images=1000, val_fraction=0.25, split_seed=2
    )
    assert data.splits == ["gram", "validation", "test"]
    train_rows, held_out = split_train_val(SIZES["train"], 0.25, 2)
    assert data.gram_rows(SIZES["train"]).tolist() == train_rows.tolist(), "all the train part, none held out"
    assert len(data.gram_datasets["dtd"]) == len(train_rows) == 45
    assert [len(loader.dataset) for loader in data.test_dataloader()] == [45, len(held_out), SIZES["test"]]
    with pytest.raises(DataError, match="gram_images must be a positive integer or null"):
        MultiTaskDataModule(["dtd"], paths={"dtd": path}, processor=tiny_processor, gram_images=0)
