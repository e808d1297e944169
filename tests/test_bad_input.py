"""Bad input through the real CLIs (``train.py``, ``merge.py``, in-process): class folders that
are not the task's classes and string labels.

Every error case ends in one ``error:`` line naming what is wrong and where, exit status 1,
and nothing written in the working directory or the output paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value

import merge_fixtures as mf
from conftest import gray_image, write_dataset
from datamodules import ImageClassificationDataModule, MultiTaskDataModule
from datamodules.sources import class_index, folder_name
from datamodules.tasks import TASKS
from merge_fixtures import one_thread  # noqa: F401  (autouse: one intra-op thread)
from train import main as train_main


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(autouse=True)
def workdir(monkeypatch, tmp_path) -> Path:
    """An empty working directory: whatever a failed run writes (outputs, exports) shows up here."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["pytest"])  # pytest's own arguments are not for the CLI
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def one_error_line(main, args: list[str], capsys) -> str:
    """Run a CLI that must fail on bad input; its one ``error:`` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return errors[0]


def assert_contains(line: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in line, (fragment, line)


# --- train.py: a tiny ConvNeXt, datasets written in tmp_path -----------------------------------


@pytest.fixture(scope="module")
def convnext(tmp_path_factory) -> Path:
    """A ConvNeXt checkpoint (8-64 channels, 32-pixel processor) to fine-tune from."""
    return mf.make_pretrained(tmp_path_factory.mktemp("models") / "convnext")


def train_args(model: Path, data: Path | str, task: str, *extra: str) -> list[str]:
    return [
        "fit",
        f"--data.task={task}",
        f"--data.path={data}",
        f"--data.processor={model}",
        "--data.batch_size=4",
        "--data.num_workers=0",
        f"--model.model_name_or_path={model}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.max_steps=1",
        *mf.QUIET,
        *extra,
    ]


def write_folders(root: Path, folders: list[str], rows_per_split: int) -> Path:
    """``<split>/<folder>/<row>.png``; row ``i`` of a split is grey value ``i`` in ``folders[i % n]``."""
    for split in ("train", "test"):
        for row in range(rows_per_split):
            folder = root / split / folders[row % len(folders)]
            folder.mkdir(parents=True, exist_ok=True)
            gray_image(row).save(folder / f"{row:04d}.png")
    return root


def single_task(task: str, data: Path | str, processor: str) -> ImageClassificationDataModule:
    """The task's DataModule with its test split set up."""
    module = ImageClassificationDataModule(task, path=str(data), processor=processor, batch_size=2, num_workers=0)
    module.setup("test")
    return module


def decoded(dataset, decode_index) -> list[tuple[int, int]]:
    return sorted((decode_index(pixels), label) for pixels, label in dataset)


# --- 1. image folders: class names, class numbers, nothing else ---------------------------------

BAD_FOLDERS = {
    # digits' classes are "0".."9": number words sort to 8, 5, 4, 9, 1, 7, 6, 3, 2, 0.
    "number words": ("digits", list(WORDS), ["'eight', 'five', 'four'", "'0', '1', '2', ...", "(0-9)"]),
    "a class number too large": ("gtsrb", [str(i) for i in range(44)], ["'43' are outside the 43 classes", "(0-42)"]),
    "numbers and a word": ("gtsrb", ["0", "1", "2", "three"], ["'0', '1', '2', 'three' match none of the class names"]),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_class_folders_that_are_neither_names_nor_numbers_are_one_error_line(case, convnext, tmp_path, workdir, capsys):
    task, folders, fragments = BAD_FOLDERS[case]
    data = write_folders(tmp_path / "images", folders, rows_per_split=2 * len(folders))
    line = one_error_line(train_main, train_args(convnext, data, task), capsys)
    assert_contains(line, f"task '{task}'", f"path '{data}'", "split '", *fragments)
    assert not list(workdir.iterdir())


def test_numbered_class_folders_are_read_by_value(tmp_path, tiny_processor, decode_index):
    """GTSRB's folders ``0``..``42`` sort as 0, 1, 10, 11, ..., 2: labels must follow the numbers,
    zero-padded or not."""
    folders = [f"{label:05d}" if label % 2 else str(label) for label in range(43)]
    data = write_folders(tmp_path / "gtsrb", folders, rows_per_split=86)
    module = single_task("gtsrb", data, tiny_processor)
    assert decoded(module.datasets["test"], decode_index) == [(row, row % 43) for row in range(86)]


def test_a_slash_in_a_class_name_is_an_underscore_in_its_folder(tmp_path, tiny_processor, decode_index):
    gtsrb = TASKS["gtsrb"].classnames
    labels = [6, 22, 25, 3]  # "end / de-restriction of 80 kph speed limit", ... and one without a slash
    folders = [gtsrb[label].replace("/", "_") for label in labels]
    data = write_folders(tmp_path / "gtsrb", folders, rows_per_split=8)
    module = single_task("gtsrb", data, tiny_processor)
    assert decoded(module.datasets["test"], decode_index) == [(row, labels[row % 4]) for row in range(8)]
    assert folder_name("Ram C/V Cargo Van Minivan 2012") == "Ram C_V Cargo Van Minivan 2012"


def _spelling(name: str) -> str:
    """The test's own statement of the accepted spellings: case, ``_`` or space, spacing."""
    return " ".join(name.lower().replace("_", " ").split())


def test_folder_spellings_are_unambiguous_across_every_task():
    every_name = {_spelling(name) for task in TASKS.values() for name in task.classnames}
    for task in TASKS.values():
        index = class_index(task)
        for label, name in enumerate(task.classnames):
            assert index[_spelling(name)] == label and index[_spelling(name.replace("/", "_"))] == label, name
            if "/" in name:  # the folder spelling is no other class's name, in any task
                assert _spelling(name.replace("/", "_")) not in every_name, name
    assert sum("/" in name for name in TASKS["gtsrb"].classnames) == 6


# --- 2. string labels --------------------------------------------------------------------------


def string_label_dataset(labels: list[str]) -> DatasetDict:
    features = Features({"image": Image(), "label": Value("string")})
    rows = {"image": [gray_image(i) for i in range(len(labels))], "label": labels}
    split = Dataset.from_dict(rows, features=features)
    return DatasetDict({"train": split, "test": split})


@pytest.mark.parametrize("form", ["parquet", "disk"])
def test_string_labels_that_are_not_class_names_are_one_error_line(form, convnext, tmp_path, workdir, capsys):
    labels = ["banded", "striped", "cat", "dog"] * 3
    data = write_dataset(string_label_dataset(labels), tmp_path / "data", form)
    line = one_error_line(train_main, train_args(convnext, data, "dtd"), capsys)
    assert_contains(line, "task 'dtd'", f"path '{data}'", "split '", "label 'cat' is not a class name of 'dtd'",
                    "'banded', 'blotchy', 'braided', ...", "2 such value(s)")  # fmt: skip
    assert not list(workdir.iterdir())


@pytest.mark.parametrize("form", ["parquet", "disk"])
def test_string_labels_are_mapped_by_class_name(form, tmp_path, tiny_processor, decode_index):
    data = write_dataset(string_label_dataset(["Crystalline", "banded"] * 3), tmp_path / "dtd", form)  # dtd 9 and 0
    module = single_task("dtd", data, tiny_processor)
    assert decoded(module.datasets["test"], decode_index) == [(row, (9, 0)[row % 2]) for row in range(6)]
    # The merge side reads labels through the same mapping.
    multi = MultiTaskDataModule(["dtd"], paths={"dtd": data}, processor=tiny_processor, num_workers=0)
    assert decoded(multi.test_datasets["dtd"], decode_index) == [(row, (9, 0)[row % 2]) for row in range(6)]
    eurosat = write_dataset(string_label_dataset(["annual_crop_land", "River"] * 2), tmp_path / "eurosat", form)
    module = single_task("eurosat", eurosat, tiny_processor)
    assert decoded(module.datasets["test"], decode_index) == [(row, (0, 8)[row % 2]) for row in range(4)]
