"""The task registry: the 24 hub tasks, the benchmarks as named task sets, class counts, names, hub ids,
splits and columns."""

from __future__ import annotations

import json
import re

import pytest

from datamodules import (
    BENCHMARK_TASKS,
    BENCHMARKS,
    FUSIONBENCH_TASKS,
    QUICKSTART_TASKS,
    TASKS,
    DataError,
    get_benchmark,
    get_task,
)
from datamodules.sources import spelling_key

EXPECTED_CLASSES = {
    "sun397": 397,
    "stanford_cars": 196,
    "resisc45": 45,
    "eurosat": 10,
    "svhn": 10,
    "gtsrb": 43,
    "mnist": 10,
    "dtd": 47,
}


def test_eight_benchmark_tasks_with_their_class_counts():
    assert set(BENCHMARK_TASKS) == set(EXPECTED_CLASSES)
    assert len(BENCHMARK_TASKS) == 8
    for name, count in EXPECTED_CLASSES.items():
        task = get_task(name)
        assert task.num_classes == count, name
        assert len(set(task.classnames)) == count, f"{name}: duplicate class names"
        assert task.hub_dataset


#: The README table of ../shared/classnames: each benchmark's tasks, in order, after the one before.
TALL14_ADDED = ("oxford_flowers102", "pcam", "fer2013", "oxford_iiit_pet", "stl10", "cifar100")
TALL20_ADDED = ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered_sst2")
OTHERS = ("emnist_mnist", "cub_200_2011", "tiny_imagenet", "mango_leaf_disease")


def test_the_benchmarks_are_named_task_sets_each_holding_the_one_before():
    assert list(BENCHMARKS) == ["ta8", "tall14", "tall20"]
    assert BENCHMARKS["ta8"] == BENCHMARK_TASKS == tuple(EXPECTED_CLASSES)
    assert BENCHMARKS["tall14"] == BENCHMARK_TASKS + TALL14_ADDED
    assert BENCHMARKS["tall20"] == BENCHMARKS["tall14"] + TALL20_ADDED
    assert FUSIONBENCH_TASKS == BENCHMARKS["tall20"] + OTHERS and len(set(FUSIONBENCH_TASKS)) == 24
    assert get_benchmark("TALL20") is BENCHMARKS["tall20"] and get_benchmark(" ta8 ") == BENCHMARK_TASKS
    with pytest.raises(DataError, match="unknown benchmark 'tall12'. Known benchmarks: ta8, tall14, tall20"):
        get_benchmark("tall12")
    assert get_task("pcam").benchmarks == ("tall14", "tall20") and get_task("tiny_imagenet").benchmarks == ()


@pytest.mark.parametrize("name", FUSIONBENCH_TASKS)
def test_names_and_hub_ids_match_shared_reference(name, shared_dir):
    reference = json.loads((shared_dir / "classnames" / f"{name}.json").read_text())
    task = get_task(name)
    assert list(task.classnames) == reference["classnames"]
    assert task.hub_dataset == reference["hub_dataset"]
    assert task.hub_config == reference["hub_config"]
    assert task.num_classes == reference["num_classes"]
    assert (task.train_split, task.test_split) == (reference.get("train_split", "train"), reference.get("test_split", "test"))
    columns = reference.get("columns", {})
    assert (task.image_column, task.label_column) == (columns.get("image", "image"), columns.get("label", "label"))
    assert task.drop_columns == tuple(columns.get("drop", ()))
    # ../shared says "TALL14" for a task TALL14 adds; here membership is BENCHMARKS, defined once.
    smallest = next((benchmark for benchmark in ("ta8", "tall14", "tall20") if name in BENCHMARKS[benchmark]), "extra")
    assert reference.get("benchmark", "TA8").lower() == smallest


@pytest.mark.parametrize("name", FUSIONBENCH_TASKS)
def test_every_entry_says_what_the_registry_reads(name, repo_root):
    entry = json.loads((repo_root / "datamodules" / "classnames" / f"{name}.json").read_text(encoding="utf-8"))
    assert entry["task"] == name and entry["num_classes"] == len(entry["classnames"])
    assert set(entry) <= {"task", "hub_dataset", "hub_config", "train_split", "test_split", "num_classes", "columns",
                          "label_type", "classnames", "note"}  # fmt: skip
    task = get_task(name)
    # No two class names of a task share a spelling, so matching a dataset's names by spelling is unambiguous.
    assert len({spelling_key(classname) for classname in task.classnames}) == task.num_classes
    assert task.label_type != "bool" or task.num_classes == 2


def test_the_quirks_of_the_real_datasets():
    food101, tiny, pcam, fer2013 = (get_task(name) for name in ("food101", "tiny_imagenet", "pcam", "fer2013"))
    assert (food101.train_split, food101.test_split) == ("train", "validation")
    assert tiny.test_split == "valid" and tiny.hub_dataset == "zh-plus/tiny-imagenet"
    # The dataset's own order (ethz/food101: 16 cheesecake, 17 cheese_plate), not FusionBench's list.
    assert food101.classnames[16:18] == ("cheesecake", "cheese plate")
    assert pcam.label_type == "bool" and pcam.hub_dataset == "1aurent/PatchCamelyon"
    assert (fer2013.image_column, fer2013.label_column, fer2013.drop_columns) == ("jpg", "cls", ("__key__", "__url__"))
    assert fer2013.label_type == "int"
    assert [get_task(name).hub_config for name in ("emnist_letters", "emnist_mnist", "kmnist")] == [
        "emnist-letters", "emnist-mnist", "kmnist",
    ]  # fmt: skip


def test_the_public_checkpoint_spelling_of_the_eight():
    # tanganke/convnext-base-224_<hub_name>_sgd_batch-size-64_lr-0.01_steps-4000: only Stanford Cars has a hyphen.
    assert [get_task(name).hub_name for name in BENCHMARK_TASKS] == [
        "sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",
    ]  # fmt: skip


def test_svhn_uses_the_cropped_digits_config():
    assert get_task("svhn").hub_config == "cropped_digits"


@pytest.mark.parametrize("spelling", ["stanford-cars", "stanford_cars", "Stanford-Cars", " stanford_cars "])
def test_task_spellings(spelling):
    task = get_task(spelling)
    assert task is TASKS["stanford_cars"]
    assert task.hub_name == "stanford-cars"


def test_quickstart_tasks_are_builtin():
    for name in QUICKSTART_TASKS:
        task = get_task(name)
        assert task.hub_dataset is None
    for name in ("digits", "mnist5k"):
        assert get_task(name).classnames == tuple(str(i) for i in range(10))
    assert get_task("shapes").num_classes == 10 and len(set(get_task("shapes").classnames)) == 10


def test_shapes_are_seeded_balanced_and_distinct():
    import numpy as np

    from datamodules.builtin import build_builtin_dataset

    first = build_builtin_dataset("shapes", get_task("shapes").classnames)
    assert (len(first["train"]), len(first["test"])) == (4800, 1200)
    labels = np.concatenate([np.asarray(first[split]["label"]) for split in ("train", "test")])
    assert np.bincount(labels).tolist() == [600] * 10
    images = np.stack([np.asarray(first["test"][i]["image"]) for i in range(50)])
    assert images.shape == (50, 28, 28) and images.max() == 255 and images.min() == 0
    assert len({image.tobytes() for image in images}) == 50  # no two drawings alike
    again = build_builtin_dataset("shapes", get_task("shapes").classnames)
    assert all(np.array_equal(np.asarray(first["test"][i]["image"]), np.asarray(again["test"][i]["image"])) for i in range(50))


def test_unknown_task_lists_known_tasks():
    with pytest.raises(DataError) as error:
        get_task("imagenet")
    message = str(error.value)
    assert "'imagenet'" in message
    for name in (*BENCHMARK_TASKS, *QUICKSTART_TASKS):
        assert name in message


def test_unknown_task_suggests_closest_match():
    with pytest.raises(DataError, match="Did you mean 'resisc45'"):
        get_task("resisc")


def test_the_readme_lists_every_task_as_the_registry_has_it(repo_root):
    rows = re.findall(
        r"^\| `(\w+)` \| `([^`]+)`(?: \(`([^`]+)`\))? \| (\d+) \| ?(\w*) ?\|", (repo_root / "README.md").read_text(), re.M
    )
    assert [row[0] for row in rows] == list(FUSIONBENCH_TASKS)
    for name, hub_dataset, hub_config, classes, first_in in rows:
        task = get_task(name)
        assert (hub_dataset, hub_config or None, int(classes)) == (task.hub_dataset, task.hub_config, task.num_classes)
        assert first_in.lower() == (task.benchmarks[0] if task.benchmarks else ""), name
