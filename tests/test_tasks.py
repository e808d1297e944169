"""The task registry: the eight benchmark tasks, their class counts, names and hub ids."""

from __future__ import annotations

import json

import pytest

from datamodules import BENCHMARK_TASKS, QUICKSTART_TASKS, TASKS, DataError, get_task

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


@pytest.mark.parametrize("name", BENCHMARK_TASKS)
def test_names_and_hub_ids_match_shared_reference(name, shared_dir):
    reference = json.loads((shared_dir / "classnames" / f"{name}.json").read_text())
    task = get_task(name)
    assert list(task.classnames) == reference["classnames"]
    assert task.hub_dataset == reference["hub_dataset"]
    assert task.hub_config == reference["hub_config"]
    assert task.num_classes == reference["num_classes"]


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
