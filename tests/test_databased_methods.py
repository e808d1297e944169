"""The data-based methods built on RegMean's data pass: Fisher merging (``merging.fisher``,
``merging.fisher_merging``) and RegMean++ (``merging.regmean_plusplus``). Fisher merging: the formula
on hand-built tensors; the Fisher of a tiny ConvNeXt against plain autograd, image by image; what each
family's tensors get; the engine against the formula on loaded checkpoints; the data pass with RegMean
and Fisher merging at once. RegMean++: the blocks of every family, in the forward's order; the merge
against a block-by-block reference written from the definition with plain hooks (Swin here, ConvNeXt
through ``merge.py``), and not RegMean; a ResNet's one line. Both: ``merge.py test`` against an
independent merge; bad input.

Expected values are worked out by hand (in the comments) or computed here with plain autograd
and the paper's (FusionBench's) formula in float64, never with the modules' own helpers. One
process against two: the Fisher is a sum of per-image terms, reduced over processes by
``merging.grams.all_reduce_sum``, the reduction RegMean's two-process test
(``tests/test_regmean_cli.py``) runs; here, in-process, the sums of disjoint parts of the images
(as two processes see them), in batches of any size, add up to the one-pass Fisher, and RegMean++'s
Grams (sums reduced the same way, block by block) give the same merge in other batchings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import test_regmean_cli as regmean_cli
import torch
from transformers import ConvNextForImageClassification

import families
import merge_fixtures as mf
import test_bad_input
from common.architectures import ARCHITECTURES
from datamodules.preprocessing import ImagePreprocessor
from lightning_modules.gram_pass import GramPass
from merge import main
from merging import METHODS, FisherMerging, RegMean, RegMeanPlusPlus, SimpleAverage
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.fisher import FisherAccumulator, mean_fishers
from merging.fisher_merging import fisher_coefficients, fisher_merge
from merging.grams import GramAccumulator, mean_grams
from merging.pool import ModelPool
from merging.regmean_plusplus import ImageBatches, backbone_blocks
from merging.saved import load_merged
from tolerances import FLOAT64_RTOL, assert_within, float64_results_bound, rounded_once

pytestmark = pytest.mark.usefixtures("one_thread")
workdir = test_bad_input.workdir  # an empty working directory, where whatever a failed run writes shows


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def close(result: torch.Tensor, expected) -> None:
    """``result`` (computed in float64, rounded to float32) against an exact or float64 ``expected``."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert result.dtype == torch.float32 and result.shape == expected.shape
    assert_within(result, expected, float64_results_bound(expected))


# --- Fisher merging: the formula ------------------------------------------------------------


def test_fisher_merge_by_hand():
    # e = 0.25, c = (1/2, 1/2). Entry 0: (1.25 * 1 + 3.25 * 3) / (1.25 + 3.25) = 11 / 4.5. Entry 1:
    # no Fisher in either task, so e alone weighs: (2 - 2) / 2 = 0, the average. Entry 2: task 1
    # only, (4.25 * 5 + 0.25 * 1) / 4.5 = 21.5 / 4.5.
    tensors = [t([1.0, 2.0, 5.0]), t([3.0, -2.0, 1.0])]
    fishers = [t([1.0, 0.0, 4.0]), t([3.0, 0.0, 0.0])]
    close(fisher_merge(iter(tensors), fishers, [0.5, 0.5], 0.25), [11 / 4.5, 0.0, 21.5 / 4.5])
    # The coefficients weigh each task's (F_t + e): c = (3/4, 1/4), entry 0: (0.75 * 1.25 + 0.25 * 3.25 * 3)
    # / (0.75 * 1.25 + 0.25 * 3.25) = 3.375 / 1.75.
    close(fisher_merge(iter(tensors), fishers, [0.75, 0.25], 0.25)[0], 3.375 / 1.75)


def test_fisher_coefficients_are_the_normalised_inverse_norms_of_the_whole_fishers():
    # Task 0: keys a = (3), b = (4): ||F_0|| = 5; task 1: a = (0, 0) ... b = (12): ||F_1|| = 12.
    # With e = 1: 1/6 and 1/13, normalised: 13/19 and 6/19. Without normalising: 1/2 each.
    fishers = {"a": [t([3.0]), t([0.0])], "b": [t([4.0]), t([12.0])]}
    assert fisher_coefficients(fishers, True, 1.0) == pytest.approx([13 / 19, 6 / 19], rel=1e-15)
    assert fisher_coefficients(fishers, False, 1.0) == [0.5, 0.5]
    with pytest.raises(MergeError, match="Fishers of different numbers of tasks"):
        fisher_coefficients({"a": [t([1.0])], "b": [t([1.0])] * 2}, True, 1e-6)


def test_equal_fishers_give_the_simple_average_and_one_task_its_own_tensor():
    tensors = [random((4, 3), seed) for seed in range(3)]
    fisher = random((4, 3), 9).abs()
    close(fisher_merge(iter(tensors), [fisher] * 3, [1 / 3] * 3, 1e-6), sum(x.double() for x in tensors) / 3)
    close(fisher_merge(iter(tensors[:1]), [fisher], [1.0], 1e-6), tensors[0])


def test_fisher_merge_refuses_mismatched_inputs_and_bad_settings():
    with pytest.raises(MergeError, match=r"a tensor of shape \[2\] has a Fisher of shape \[3\]"):
        fisher_merge(iter([torch.ones(2)]), [torch.ones(3)], [1.0], 1e-6)
    with pytest.raises(MergeError, match="1 tensors for 2 Fishers"):
        fisher_merge(iter([torch.ones(2)]), [torch.ones(2)] * 2, [0.5, 0.5], 1e-6)
    with pytest.raises(MergeError, match="more tensors than the 1 Fishers"):
        fisher_merge(iter([torch.ones(2)] * 2), [torch.ones(2)], [1.0], 1e-6)
    for bad in (0.0, -1e-6, math.nan, math.inf):
        with pytest.raises(MergeError, match="minimal_fisher_weight must be a positive finite number"):
            FisherMerging(minimal_fisher_weight=bad)


def test_fisher_merging_is_registered_and_described():
    assert METHODS["fisher_merging"] is FisherMerging
    assert FisherMerging().describe() == "fisher_merging(normalize_fisher_weight=True, minimal_fisher_weight=1e-06)"
    method = FisherMerging(normalize_fisher_weight=False)
    assert method.needs_fisher and method.needs_data and not method.needs_grams and not method.uses_pretrained
    assert not SimpleAverage().needs_data and RegMean().needs_data


# --- The Fisher of a tiny model, against autograd --------------------------------------------


def autograd_fisher(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(1/N) sum_x (d s(x) / d theta)^2``, ``s = sum_c sqrt(p_c) log p_c`` with ``sqrt(p)`` constant,
    one backward per image through the plain classifier (its own head), for every backbone parameter."""
    sums: dict[str, torch.Tensor] = {}
    for image in images:
        model.zero_grad()
        log_p = torch.log_softmax(model(pixel_values=image[None]).logits, dim=-1)
        (torch.sqrt(torch.exp(log_p)).detach() * log_p).sum().backward()
        for name, parameter in model.convnext.named_parameters():
            squares = parameter.grad.detach() ** 2
            sums[f"convnext.{name}"] = sums.get(f"convnext.{name}", 0) + squares
    return {key: total / len(images) for key, total in sums.items()}


def batch_level_fisher(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """FusionBench's estimator on one batch: the squared gradient of the batch's summed target."""
    model.zero_grad()
    log_p = torch.log_softmax(model(pixel_values=images).logits, dim=-1)
    (torch.sqrt(torch.exp(log_p)).detach() * log_p).sum().backward()
    return {f"convnext.{name}": p.grad.detach() ** 2 / len(images) for name, p in model.convnext.named_parameters()}


def fisher_bound(expected: torch.Tensor) -> torch.Tensor:
    """Two float64 computations of a sum of squared gradients: each gradient errs normwise by at most
    ``rho = FLOAT64_RTOL / 2`` of itself (``tolerances.FLOAT64_RTOL``), so each square's entries by at
    most ``(2 rho + rho^2)`` of the sum of the squares (an L1 bound), and two computations by twice that."""
    return (2 * FLOAT64_RTOL + FLOAT64_RTOL**2) * expected.sum()


def accumulated(accumulator: FisherAccumulator, batches) -> dict[str, torch.Tensor]:
    for batch in batches:
        accumulator(batch)
    sums, images = accumulator.reduced_sums(torch.device("cpu"))
    return dict(zip(accumulator.keys, mean_fishers(sums, images, "task")))


def test_the_fisher_is_the_per_image_squared_gradient_of_the_target_in_any_batches(tmp_path):
    directory = mf.make_finetuned(mf.make_pretrained(tmp_path / "pretrained"), tmp_path / "dtd", "dtd", seed=3)
    model = ConvNextForImageClassification.from_pretrained(directory).eval().double()
    images = random((5, 3, 32, 32), 4).double()
    expected = autograd_fisher(model, images)
    one_pass = FisherAccumulator(model.convnext.requires_grad_(False), model.classifier)
    got = accumulated(one_pass, [images])
    assert one_pass.keys == list(expected) and one_pass.images == 5
    # Disjoint parts in other batches (two processes of 3 and 2 images, batches of 2): the sums add up.
    parts = [FisherAccumulator(model.convnext, model.classifier) for _ in range(2)]
    for part, batches in zip(parts, [[images[0:2], images[2:3]], [images[3:5]]]):
        for batch in batches:
            part(batch)
    split = {key: (a + b) / 5 for key, a, b in zip(parts[0].keys, parts[0].sums, parts[1].sums)}
    batched = batch_level_fisher(model.requires_grad_(True), images)
    differs = 0
    for key, reference in expected.items():
        assert got[key].dtype == torch.float64 and torch.all(got[key] >= 0), key
        assert_within(got[key], reference, fisher_bound(reference), key)
        assert_within(split[key], reference, fisher_bound(reference), key)
        differs += bool(((batched[key] - reference).abs() > 10 * fisher_bound(reference)).any())
    # FusionBench's batch-level square (cross terms between images) is another statistic.
    assert differs > len(expected) // 2


def test_the_fisher_pass_has_an_entry_per_parameter_and_none_for_buffers(tmp_path):
    """A ResNet's BatchNorm statistics (buffers) get no Fisher; DINOv2's ``mask_token``, which the
    forward never reads, a zero one; every other parameter one of its shape."""
    for model_type in ("resnet", "dinov2"):
        record = ARCHITECTURES[model_type]
        directory = families.make_pretrained(model_type, tmp_path / model_type)
        model = record.classifier_class.from_pretrained(directory).eval()
        backbone = record.backbone_of(model).requires_grad_(False)
        accumulator = FisherAccumulator(backbone, record.head_linear(model))
        fishers = accumulated(accumulator, [random((3, 3, 32, 32), 5)])
        names = record.checkpoint_keys(backbone.config)
        parameters = {name for name, _ in backbone.named_parameters()}
        assert {names[key] for key in fishers} == parameters and len(fishers) == len(parameters)
        zero = [key for key, fisher in fishers.items() if not fisher.any()]
        assert zero == (["dinov2.embeddings.mask_token"] if model_type == "dinov2" else []), model_type


# --- The engine ----------------------------------------------------------------------------

TASKS = ("eurosat", "dtd", "gtsrb")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("fisher_pool"), TASKS, seed=2)


def random_fishers(keys_and_shapes, num_tasks: int, seed: int) -> dict[str, list[torch.Tensor]]:
    """Positive squared noise of every shape, a third of its entries zero, larger for later tasks."""
    fishers = {}
    for k, (key, shape) in enumerate(keys_and_shapes):
        per_task = []
        for task in range(num_tasks):
            values = random(shape, seed + 10 * k + task) ** 2 * (task + 1)
            per_task.append(torch.where(random(shape, seed + 10 * k + task + 5) > 0.43, values, 0.0))
        fishers[key] = per_task
    return fishers


def reference_fisher_merge(tensors, fishers, normalize: bool, e: float) -> dict[str, torch.Tensor]:
    """The formula in float64 on whole tensors: ``c_t = 1 / (||F_t|| + e)``, normalised (or 1/T),
    ``sum_t c_t (F_t + e) theta_t / sum_t c_t (F_t + e)``."""
    num_tasks = len(tensors)
    if normalize:
        norms = [math.sqrt(sum(float((f[t].double() ** 2).sum()) for f in fishers.values())) for t in range(num_tasks)]
        inverse = torch.tensor([1 / (n + e) for n in norms], dtype=torch.float64)
        c = inverse / inverse.sum()
    else:
        c = torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)
    merged = {}
    for key, per_task in fishers.items():
        weights = [c[t] * (per_task[t].double() + e) for t in range(num_tasks)]
        merged[key] = sum(w * tensors[t][key].double() for t, w in enumerate(weights)) / sum(weights)
    return merged


@pytest.mark.parametrize("normalize", [True, False])
def test_merge_backbone_weighs_every_parameter_by_its_fishers(pool, normalize):
    state = mf.backbone(mf.load_state(pool[mf.PRETRAINED]))
    fishers = random_fishers([(key, tensor.shape) for key, tensor in state.items()], len(TASKS), seed=7)
    method = FisherMerging(normalize_fisher_weight=normalize, minimal_fisher_weight=0.05)
    merged = merge_backbone(ModelPool(pool), method, progress=False, fishers=fishers)
    finetuned = [mf.backbone(mf.load_state(pool[task])) for task in TASKS]
    expected = reference_fisher_merge(finetuned, fishers, normalize, 0.05)
    average = mf.reference_simple_average(finetuned)
    assert sorted(merged) == sorted(expected)
    for key, tensor in expected.items():
        assert_within(merged[key], tensor, float64_results_bound(tensor), key)
        if tensor.numel() > 8:
            assert not torch.allclose(merged[key], average[key], atol=1e-3), key


def test_on_a_resnet_the_batchnorm_statistics_are_averaged_and_the_counters_the_pretrained_ones(tmp_path):
    models = families.make_pool("resnet", tmp_path / "resnet", TASKS[:2])
    model_pool = ModelPool(models)
    record = ARCHITECTURES["resnet"]
    parameters = {name for name, _ in record.build_backbone(model_pool.config()).named_parameters()}
    names = record.checkpoint_keys(model_pool.config())
    reader = model_pool.reader(mf.PRETRAINED)
    keys = [(key, reader.shape(key)) for key in model_pool.merge_keys if names[key] in parameters]
    merged = merge_backbone(model_pool, FisherMerging(), progress=False, fishers=random_fishers(keys, 2, seed=3))
    average = merge_backbone(model_pool, SimpleAverage(), progress=False)
    buffers = [key for key in model_pool.merge_keys if names[key] not in parameters]
    assert buffers and all(key.endswith(("running_mean", "running_var")) for key in buffers)
    assert all(torch.equal(merged[key], average[key]) for key in buffers)
    assert all(torch.equal(merged[key], reader.read(key)) for key in model_pool.counter_keys)


def test_merge_backbone_refuses_fisher_merging_without_fishers_and_fishers_for_others(pool):
    state = mf.backbone(mf.load_state(pool[mf.PRETRAINED]))
    fishers = random_fishers([(key, tensor.shape) for key, tensor in state.items()], len(TASKS), seed=1)
    with pytest.raises(MergeError, match="needs the diagonal Fisher of every fine-tuned model.*data.gram_images"):
        merge_backbone(ModelPool(pool), FisherMerging(), progress=False)
    with pytest.raises(MergeError, match="merges without Fishers"):
        merge_backbone(ModelPool(pool), SimpleAverage(), progress=False, fishers=fishers)
    key = next(iter(fishers))
    with pytest.raises(MergeError, match=f"'{key}' has 2 Fishers for 3 fine-tuned models"):
        merge_backbone(ModelPool(pool), FisherMerging(), progress=False, fishers={**fishers, key: fishers[key][:2]})
    with pytest.raises(MergeError, match="keys the backbone lacks: convnext.nope"):
        merge_backbone(ModelPool(pool), FisherMerging(), progress=False, fishers={**fishers, "convnext.nope": []})


def test_one_pass_gathers_the_grams_and_the_fishers_of_a_comparison_as_separate_passes(pool):
    """RegMean and Fisher merging in one comparison share each task's backbone: the Gram hooks
    record during the Gram forward only, so neither statistic changes (the same operations: the same bits)."""
    images = {task: random((3, 3, 32, 32), 20 + index) for index, task in enumerate(TASKS)}

    def run(methods):
        data_pass = GramPass(ModelPool(pool), list(TASKS), methods)
        with torch.inference_mode():  # as in Lightning's test loop
            for task in TASKS:
                data_pass.step(images[task], task)
            return data_pass.statistics(torch.device("cpu"))

    both, grams, fishers = run([RegMean(), FisherMerging()]), run([RegMean()]), run([FisherMerging()])
    assert grams.fishers is None and fishers.grams is None and both.images == {task: 3 for task in TASKS}
    for mine, alone in [(both.grams, grams.grams), (both.fishers, fishers.fishers)]:
        assert list(mine) == list(alone)
        assert all(torch.equal(a, b) for key in mine for a, b in zip(mine[key], alone[key]))


# --- merge.py test ---------------------------------------------------------------------------

E = 1e-4  # the runs' minimal_fisher_weight (see the bound in test_merge_py_equals_an_independent_fisher_merge)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> regmean_cli.Setup:
    root = tmp_path_factory.mktemp("fisher_cli")
    models = mf.make_pool(root / "models", regmean_cli.TASKS, seed=4)
    data = {
        task: regmean_cli.make_train_test_set(root / "data" / task, task, models[task], seed=40 + i)
        for i, task in enumerate(regmean_cli.TASKS)
    }
    return regmean_cli.Setup(models, data)


def fisher_args(setup, out, *extra: str, gram_images: int | None = regmean_cli.GRAM_IMAGES) -> list[str]:
    command = regmean_cli.args(setup, out, "--trainer.devices", "1", method="FisherMerging", gram_images=gram_images)
    return command + ["--model.method.minimal_fisher_weight", str(E), *extra]


def test_merge_py_equals_an_independent_fisher_merge(setup, tmp_path):
    """In float64 (``mf.FLOAT64``) on 15 and 11 train images (``regmean_cli.gram_rows``). Each
    merged entry is a ratio of Fisher-weighted sums: a change ``dF`` of the Fishers (bounded by
    ``fisher_bound``, the two runs' float64 Fishers) moves it by at most ``|theta_t - theta| c_t |dF_t|
    / sum_t c_t (F_t + e)`` summed over tasks, plus as much again for the coefficients (norms of the same
    Fishers), plus the two float64 merges' own rounding (``float64_results_bound``)."""
    main(fisher_args(setup, tmp_path, "--model.save_dir", str(tmp_path / "saved")))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["gram_images"] == regmean_cli.GRAM_COUNTS
    merged = load_merged(tmp_path / "saved").backbone
    finetuned = [mf.backbone(mf.load_state(setup.pool[task])) for task in regmean_cli.TASKS]
    fishers: dict[str, list[torch.Tensor]] = {}
    for task in regmean_cli.TASKS:
        train = datasets.load_from_disk(setup.data[task])["train"]
        preprocess = ImagePreprocessor.from_pretrained(setup.pool[task])
        rows = regmean_cli.gram_rows(len(train))
        images = torch.stack([preprocess(train[row]["image"]) for row in rows]).double()
        model = ConvNextForImageClassification.from_pretrained(setup.pool[task]).eval().double()
        for key, fisher in autograd_fisher(model, images).items():
            fishers.setdefault(key, []).append(fisher)
    expected = reference_fisher_merge(finetuned, fishers, True, E)
    average = mf.reference_simple_average(finetuned)
    c = fisher_coefficients(fishers, True, E)
    assert sorted(merged) == sorted(expected)
    for key, tensor in expected.items():
        weights = sum(c_t * (f.double() + E) for c_t, f in zip(c, fishers[key]))
        spread = sum(c_t * (m[key].double() - tensor).abs() for c_t, m in zip(c, finetuned))
        moved = spread * sum(fisher_bound(f) for f in fishers[key]) / weights
        bound = 2 * moved + 2 * FLOAT64_RTOL * spread + float64_results_bound(tensor) + rounded_once(tensor)
        assert_within(merged[key], tensor, bound, key)
        # The Fisher weighting moves every tensor far more than the bound allows (a test that can fail).
        assert float((merged[key].double() - average[key]).abs().max()) > 100 * float(bound.max()), key
    (name,) = report["rows"]
    assert name == f"fisher_merging(normalize_fisher_weight=True, minimal_fisher_weight={E:g})"


BAD_INPUT = {
    "Fisher merging without gram images": (
        [], None, "this merge needs unlabelled train images for the Fisher of each fine-tuned model: set data.gram_images"
    ),
    "a zero minimal Fisher weight": (
        ["--model.method.minimal_fisher_weight", "0"], regmean_cli.GRAM_IMAGES,
        "minimal_fisher_weight must be a positive finite number, got 0.0",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_error_line_and_nothing_written(setup, workdir, capsys, case):
    extra, gram_images, message = BAD_INPUT[case]
    args = fisher_args(setup, workdir, *extra, gram_images=gram_images)
    test_bad_input.assert_contains(test_bad_input.one_error_line(main, args, capsys), message)
    assert not list(workdir.iterdir())


# --- RegMean++ ---------------------------------------------------------------------------------

#: The blocks ``backbone_blocks`` must find in each family's tiny config (``tests/families.py``).
BLOCKS = {
    "convnext": [f"encoder.stages.{stage}.layers.0" for stage in range(4)],
    "convnextv2": ["encoder.stages.0.layers.0", "encoder.stages.1.layers.0"],
    "resnet": [],
    "vit": ["layers.0", "layers.1"],
    "dinov2": ["encoder.layer.0", "encoder.layer.1"],
    "swin": ["encoder.layers.0.blocks.0", "encoder.layers.0.downsample", "encoder.layers.1.blocks.0"],
}


@pytest.mark.parametrize("model_type", list(families.CONFIGS))
def test_the_blocks_of_every_family_hold_every_linear_once_in_the_forwards_order(model_type):
    backbone = ARCHITECTURES[model_type].build_backbone(families.family_config(model_type)).eval()
    blocks = backbone_blocks(backbone)
    assert [name for name, _ in blocks] == BLOCKS[model_type]
    linears = [name for name, module in backbone.named_modules() if isinstance(module, torch.nn.Linear)]
    assert sorted(linears) == sorted(f"{block}.{name}" for block, module in blocks for name, inner in module.named_modules()
                                     if isinstance(inner, torch.nn.Linear))  # fmt: skip
    called = []
    for name, module in blocks:
        module.register_forward_pre_hook(lambda m, args, name=name: called.append(name))
    with torch.no_grad():
        backbone(pixel_values=random((1, 3, 32, 32), 0))
    assert called == BLOCKS[model_type]


def images_of(tasks, sizes, seed: int) -> dict[str, list[torch.Tensor]]:
    """Float64 "preprocessed images" per task, in batches of ``sizes``."""
    return {
        task: [random((size, 3, 32, 32), seed + 10 * index + k).double() for k, size in enumerate(sizes)]
        for index, task in enumerate(tasks)
    }


def reference_regmean_plusplus(models: dict[str, str], images, ratio: float, merged: dict[str, torch.Tensor]):
    """Block by block from the paper's (FusionBench's) definition, in float64 with plain hooks: block
    ``l``'s Grams from a forward of the model whose tensors outside the blocks are the simple average, whose
    blocks before ``l`` are ``merged``'s (the merge under test: so each block is checked from the same
    inputs) and whose block ``l`` is model ``t``'s, on task ``t``'s images; the closed form with an explicit
    inverse; the block's other tensors averaged. Returns the expected tensors of every key."""
    tasks = [task for task in models if task != mf.PRETRAINED]
    record = ARCHITECTURES[json.loads((Path(models[mf.PRETRAINED]) / "config.json").read_text())["model_type"]]
    config = record.classifier_class.config_class.from_pretrained(models[mf.PRETRAINED])
    names = record.checkpoint_keys(config)
    finetuned = [{key: tensor for key, tensor in mf.load_state(models[task]).items() if key in names} for task in tasks]
    average = {
        key: sum(m[key].double() for m in finetuned) / len(tasks) for key in names if finetuned[0][key].is_floating_point()
    }
    expected = dict(average)
    done: list[str] = []
    for block in BLOCKS[record.model_type]:
        inside = [key for key in names if names[key].startswith(f"{block}.")]
        linear_keys = set()
        grams: dict[str, list[torch.Tensor]] = {}
        for index, task in enumerate(tasks):
            state = {**{key: t.clone() for key, t in finetuned[index].items()}, **average}
            state.update({key: merged[key].double() for key in done})
            state.update({key: finetuned[index][key].double() for key in inside})
            model = record.backbone_from_state(config, state).double().eval()
            seen: dict[str, list[torch.Tensor]] = {}
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name.startswith(f"{block}."):
                    key = next(k for k in names if names[k] == f"{name}.weight")
                    linear_keys.add(key)
                    module.register_forward_pre_hook(lambda m, args, key=key, seen=seen: seen.setdefault(key, []).append(args[0]))
            with torch.no_grad():
                model(pixel_values=torch.cat(images[task]))
            for key, inputs in seen.items():
                rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
                grams.setdefault(key, []).append(rows.T @ rows / rows.shape[0])
        for key in linear_keys:
            shrunk = [ratio * g + (1 - ratio) * torch.diag(torch.diagonal(g)) for g in grams[key]]
            weighted = sum(g @ m[key].double().T for g, m in zip(shrunk, finetuned))
            expected[key] = (torch.from_numpy(np.linalg.inv(sum(shrunk).numpy())) @ weighted).T
        done += inside
    return expected


@pytest.mark.parametrize("model_type", ["swin"])  # ConvNeXt: test_merge_py_equals_an_independent_regmean_plusplus
def test_regmean_plusplus_is_regmean_on_the_merged_models_activations_block_by_block(tmp_path, model_type):
    """Against the reference, in float64 (two float64 computations of each closed form from the same
    inputs, rounded to float32 once: ``float64_results_bound``), in two different batchings (as two
    processes would split the images: the sums add up); not RegMean, whose Grams come from each fine-tuned
    model's own activations."""
    tasks = TASKS[:2]
    models = families.make_pool(model_type, tmp_path / model_type, tasks)
    images = images_of(tasks, (3, 2), seed=5)
    rebatched = {task: list(torch.cat(batches).split(1)) for task, batches in images.items()}
    method = RegMeanPlusPlus(0.8)
    merged = merge_backbone(
        ModelPool(models), method, progress=False, images=ImageBatches(images, torch.device("cpu"), torch.float64)
    )
    again = merge_backbone(
        ModelPool(models), method, progress=False, images=ImageBatches(rebatched, torch.device("cpu"), torch.float64)
    )
    expected = reference_regmean_plusplus(models, images, 0.8, merged)
    grams = {}
    for task in tasks:  # RegMean: the fine-tuned models' own activations
        accumulator = GramAccumulator(families_backbone(models[task]).double())
        with torch.no_grad():
            accumulator(torch.cat(images[task]))
        sums, rows, _ = accumulator.reduced_sums(torch.device("cpu"))
        for key, gram in zip(accumulator.keys, mean_grams(sums, rows, accumulator.keys, task)):
            grams.setdefault(key, []).append(gram)
    plain = merge_backbone(ModelPool(models), RegMean(0.8), progress=False, grams=grams)
    assert sorted(merged) == sorted(expected)
    for key, tensor in expected.items():
        for result in (merged, again):
            assert_within(result[key], tensor, float64_results_bound(tensor), key)
        if key in grams:
            assert (plain[key].double() - tensor).abs().max() > 100 * float64_results_bound(tensor).max(), key


def families_backbone(directory: str) -> torch.nn.Module:
    record = ARCHITECTURES[json.loads((Path(directory) / "config.json").read_text())["model_type"]]
    return record.backbone_of(record.classifier_class.from_pretrained(directory)).eval()


def test_regmean_plusplus_on_a_resnet_says_it_is_the_simple_average_and_is(tmp_path, capsys):
    models = families.make_pool("resnet", tmp_path / "resnet", TASKS[:2])
    images = ImageBatches(images_of(TASKS[:2], (2,), seed=1), torch.device("cpu"), torch.float64)
    merged = merge_backbone(ModelPool(models), RegMeanPlusPlus(), progress=True, images=images)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "on this ResNet backbone" in line]
    assert line == (
        "regmean_plusplus(reduce_non_diagonal_ratio=0.95) on this ResNet backbone: none of its layers is an nn.Linear (its "
        "layers are convolutions), so no Gram matrix is used and every tensor is the simple average: this merge is the simple average"
    )
    average = merge_backbone(ModelPool(models), SimpleAverage(), progress=False)
    assert sorted(merged) == sorted(average) and all(torch.equal(merged[key], average[key]) for key in average)


def test_merge_backbone_refuses_regmean_plusplus_without_images_and_images_for_others(pool):
    images = ImageBatches(images_of(TASKS, (2,), seed=2), torch.device("cpu"), torch.float64)
    with pytest.raises(MergeError, match="runs the models on each task's unlabelled train images: set data.gram_images"):
        merge_backbone(ModelPool(pool), RegMeanPlusPlus(), progress=False)
    with pytest.raises(MergeError, match="merges without images"):
        merge_backbone(ModelPool(pool), SimpleAverage(), progress=False, images=images)
    with pytest.raises(MergeError, match="RegMean\\+\\+ has no images of task\\(s\\) gtsrb"):
        partial = ImageBatches({task: images.batches[task] for task in TASKS[:2]}, images.device, images.dtype)
        merge_backbone(ModelPool(pool), RegMeanPlusPlus(), progress=False, images=partial)
    for bad in (-0.1, 1.5):
        with pytest.raises(MergeError, match="reduce_non_diagonal_ratio must be in"):
            RegMeanPlusPlus(reduce_non_diagonal_ratio=bad)
    assert METHODS["regmean_plusplus"] is RegMeanPlusPlus and RegMeanPlusPlus().needs_images
    assert RegMeanPlusPlus(0.5).describe() == "regmean_plusplus(reduce_non_diagonal_ratio=0.5)"


def test_merge_py_equals_an_independent_regmean_plusplus(setup, tmp_path):
    """In float64 on the same 15 and 11 train rows as RegMean's own test: the saved merge against the
    block-by-block reference on those images, preprocessed by the project's ``ImagePreprocessor``."""
    command = regmean_cli.args(setup, tmp_path, "--trainer.devices", "1", method="RegMeanPlusPlus")
    main([*command, "--model.method.reduce_non_diagonal_ratio", "0.9", "--model.save_dir", str(tmp_path / "saved")])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["gram_images"] == regmean_cli.GRAM_COUNTS
    assert list(report["rows"]) == ["regmean_plusplus(reduce_non_diagonal_ratio=0.9)"]
    merged = load_merged(tmp_path / "saved").backbone
    images = {}
    for task in regmean_cli.TASKS:
        train = datasets.load_from_disk(setup.data[task])["train"]
        preprocess = ImagePreprocessor.from_pretrained(setup.pool[task])
        images[task] = [torch.stack([preprocess(train[row]["image"]) for row in regmean_cli.gram_rows(len(train))]).double()]
    expected = reference_regmean_plusplus(setup.pool, images, 0.9, merged)
    assert sorted(merged) == sorted(expected)
    for key, tensor in expected.items():
        assert_within(merged[key], tensor, float64_results_bound(tensor), key)


REGMEAN_PLUSPLUS_BAD_INPUT = {
    "RegMean++ without gram images": (
        [], None, "this merge needs unlabelled train images for the Gram matrices of the merged model's activations: set data.gram_images"
    ),
    "a ratio above 1": (["--model.method.reduce_non_diagonal_ratio", "1.5"], regmean_cli.GRAM_IMAGES,
                        "reduce_non_diagonal_ratio must be in [0, 1], got 1.5"),
}  # fmt: skip


@pytest.mark.parametrize("case", REGMEAN_PLUSPLUS_BAD_INPUT)
def test_regmean_plusplus_bad_input_is_one_error_line_and_nothing_written(setup, workdir, capsys, case):
    extra, gram_images, message = REGMEAN_PLUSPLUS_BAD_INPUT[case]
    command = regmean_cli.args(
        setup, workdir, "--trainer.devices", "1", *extra, method="RegMeanPlusPlus", gram_images=gram_images
    )
    test_bad_input.assert_contains(test_bad_input.one_error_line(main, command, capsys), message)
    assert not list(workdir.iterdir())
