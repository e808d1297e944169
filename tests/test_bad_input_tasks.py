"""Hub datasets that do not fit their registry entry, through the real ``train.py`` (in-process):
booleans for a task without boolean labels, class names that match only in part or match none
and are too few to read by index, and a test split under none of the task's names.

Every case ends in one ``error:`` line naming the task, the path and what is wrong, exit status 1,
and nothing written in the working directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import ClassLabel, DatasetDict, Value

import hf_home
import test_bad_input as bad_input
from conftest import gray_image, write_dataset
from datamodules.tasks import get_task
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

# tests/test_bad_input.py's fixtures (the tiny ConvNeXt, the empty working directory) and helpers.
convnext, workdir = bad_input.convnext, bad_input.workdir
train_args, one_error_line, assert_contains = bad_input.train_args, bad_input.one_error_line, bad_input.assert_contains


def standin(task: str, train: int = 8, test: int = 4) -> DatasetDict:
    return hf_home.standin(task, {"train": train, "test": test}, images=lambda count, mode: [gray_image(i) for i in range(count)])


def booleans(task: str) -> DatasetDict:
    return standin(task).cast_column("label", Value("int64")).cast_column("label", Value("bool"))


def relabelled(task: str, names: list[str]) -> DatasetDict:
    return standin(task).cast_column("label", ClassLabel(names=names))


FASHION = list(get_task("fashion_mnist").classnames)
CASES = {
    "booleans for a task without them": (
        "rendered_sst2", lambda: booleans("rendered_sst2"),
        ["split 'train'", "the label column holds booleans, which name no class of 'rendered_sst2'",
         "only a task whose registry entry has label_type bool, such as pcam, reads them"],
    ),
    "class names that match in part": (
        "fashion_mnist", lambda: relabelled("fashion_mnist", [*FASHION[:3], "Dres", *FASHION[4:8], "Handbag", FASHION[9]]),
        ["class name(s) 'Dres', 'Handbag' are not classes of 'fashion_mnist'", "'Dres': closest class 'Dress'",
         "'Handbag': closest class 'Bag'", "8 of the 10 names match"],
    ),
    "names that match none, too few to read by index": (
        "tiny_imagenet", lambda: relabelled("tiny_imagenet", [f"n{index:08d}" for index in range(199)]),
        ["the dataset's 199 class names ('n00000000', 'n00000001', 'n00000002', ...) match none of the 200 class names "
         "of 'tiny_imagenet' ('goldfish', 'European fire salamander', 'bullfrog', ...), so its labels cannot be read by index"],
    ),
    "a test split under none of the task's names": (
        "food101", lambda: DatasetDict({"train": standin("food101")["train"], "valid": standin("food101")["validation"]}),
        ["no 'validation' split, nor 'test' (found: train, valid)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_dataset_that_does_not_fit_its_task_is_one_error_line(case, convnext, tmp_path: Path, workdir: Path, capsys) -> None:
    task, dataset, fragments = CASES[case]
    data = write_dataset(dataset(), tmp_path / "data", "disk")
    line = one_error_line(train_main, train_args(convnext, data, task), capsys)
    assert_contains(line, f"error: task '{task}', path '{data}'", *fragments)
    assert not list(workdir.iterdir())
