"""Bad input through the real CLIs (``train.py``, ``merge.py``, in-process): class folders that
are not the task's classes, string labels, checkpoints of no supported family or of two families
in one pool, broken AdaMerging
coefficient files, and the staging directory a killed save leaves behind.

Every error case ends in one ``error:`` line naming what is wrong and where, exit status 1,
and nothing written in the working directory or the output paths.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Image, Value
from transformers import RegNetConfig, RegNetForImageClassification, ResNetConfig, ResNetForImageClassification

import merge_fixtures as mf
from common.files import check_output_location, remove_dead_staging
from conftest import gray_image, index_dataset, write_dataset
from datamodules import ImageClassificationDataModule, MultiTaskDataModule
from datamodules.sources import class_index, folder_name
from datamodules.tasks import TASKS, get_task
from lightning_modules.adamerging import AdaMerging
from merge import main as merge_main
from merging import METHODS
from merging.coefficients import LearnedCoefficients, write_coefficients
from merging.engine import merge_backbone
from merging.methods import TaskArithmetic
from merging.pool import ModelPool
from merging.saved import save_merged
from tolerances import assert_within, linear_merge_bound
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

MERGE_TASKS = ("eurosat", "dtd")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(autouse=True)
def workdir(quiet_cli: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: whatever a failed run writes (outputs, exports) shows up here."""
    work = quiet_cli / "work"
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
        "--model.lr=0.01",
        "--model.momentum=0.9",
        "--model.weight_decay=0.0001",
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


# --- 3. checkpoints of no supported family, or of two families in one pool ---------------------


def small_dataset(task: str) -> DatasetDict:
    return index_dataset({"train": 12, "test": 4}, get_task(task).classnames)


#: What an unsupported family is told (``common.architectures.supported_families``).
UNSUPPORTED = (
    "is a 'regnet' model (RegNetForImageClassification), not one of the supported families: ConvNeXt (convnext), "
    "ConvNeXt-V2 (convnextv2), ResNet (resnet), ViT (vit), DINOv2 (dinov2), Swin (swin)"
)


@pytest.fixture(scope="module")
def regnet(tmp_path_factory) -> Path:
    """A tiny RegNet: an image classifier of transformers that no architecture record describes."""
    directory = tmp_path_factory.mktemp("regnet")
    config = RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=10)
    torch.manual_seed(0)
    RegNetForImageClassification(config).save_pretrained(directory)
    return directory


def make_resnet(directory: Path, stages: int) -> Path:
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64][:stages], depths=[1] * stages, num_labels=10)
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def resnets(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("resnets")
    return {stages: make_resnet(root / f"resnet-{stages}-stages", stages) for stages in (4, 2)}


def test_fine_tuning_from_an_unsupported_family_is_one_error_line(regnet, convnext, tmp_path, workdir, capsys):
    data = write_dataset(small_dataset("mnist"), tmp_path / "mnist", "disk")
    args = train_args(convnext, data, "mnist", f"--model.model_name_or_path={regnet}")
    line = one_error_line(train_main, args, capsys)
    assert_contains(line, f"checkpoint '{regnet}'", UNSUPPORTED)
    assert not list(workdir.iterdir())


def rewrite_backbone(directory: Path, case: str) -> str:
    """Drop one backbone tensor, or add one the ConvNeXt config does not have; the key."""
    key = "convnext.encoder.stages.1.layers.0.pwconv1.weight"
    if case == "missing":
        mf.rewrite_tensors(directory, lambda state: {k: v for k, v in state.items() if k != key})
        return key
    extra = "convnext.encoder.stages.1.layers.1.pwconv1.weight"
    mf.rewrite_tensors(directory, lambda state: {**state, extra: state[key].clone()})
    return extra


@pytest.mark.parametrize("case", ["missing", "unexpected"])
def test_fine_tuning_from_a_convnext_with_other_backbone_weights_is_one_error_line(case, convnext, tmp_path, workdir, capsys):
    key = rewrite_backbone(mf.copy_checkpoint(convnext, tmp_path / "model"), case)
    data = write_dataset(small_dataset("mnist"), tmp_path / "mnist", "disk")
    line = one_error_line(train_main, train_args(tmp_path / "model", data, "mnist"), capsys)
    expected = f"does not hold the backbone its ConvNeXt config describes: 1 {case} weight(s) ({key})"
    assert_contains(line, f"checkpoint '{tmp_path / 'model'}'", expected)
    assert not list(workdir.iterdir())


# --- merge.py: a tiny pool and test sets --------------------------------------------------------


@dataclass
class Pool:
    models: dict[str, str]
    data: dict[str, str]
    keys: list[str]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Pool:
    root = tmp_path_factory.mktemp("pool")
    models = mf.make_pool(root / "models", MERGE_TASKS)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, 6, models[task], seed=20 + index))
        for index, task in enumerate(MERGE_TASKS)
    }
    keys = [key for key in mf.load_state(models[mf.PRETRAINED]) if key.startswith("convnext.")]
    return Pool(models, data, keys)


def merge_args(pool: Pool, out: Path, *model: str, models: dict | None = None) -> list[str]:
    return [
        *mf.merge_test_args(out, {task: pool.data[task] for task in MERGE_TASKS}, pool.models[mf.PRETRAINED], 4),
        *model,
        "--model.models", json.dumps(models or pool.models),
        "--model.report_dir", str(out / "report"),
    ]  # fmt: skip


def merged_classifier(out: Path, *method: str, save_dir: Path | None = None) -> list[str]:
    save_dir = save_dir or out / "merged"
    return ["--model", "lightning_modules.merged.MergedClassifier", "--model.save_dir", str(save_dir), *method]


def assert_nothing_written(out: Path, workdir: Path) -> None:
    assert not (out / "report").exists() and not (out / "merged").exists() and not (out / "coefficients").exists()
    assert not (out / "root").exists()  # trainer.default_root_dir: no config.yaml of a refused run
    assert not list(workdir.iterdir())


@pytest.mark.parametrize("member", [mf.PRETRAINED, "dtd"])
@pytest.mark.parametrize("stages", [4, 2])
def test_a_resnet_in_a_convnext_pool_is_one_error_line_naming_both_families(
    member, stages, pool, resnets, tmp_path, workdir, capsys
):
    # Four stages end at 64 channels, as the tiny ConvNeXt does: the family is told by the
    # config, not by the head's shape.
    models = {**pool.models, member: str(resnets[stages])}
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(tmp_path), models=models), capsys)
    # The first entry of another family than _pretrained_'s is named: the first task, or the ResNet.
    other, kinds = ("eurosat", ("ResNet", "ConvNeXt")) if member == mf.PRETRAINED else ("dtd", ("ConvNeXt", "ResNet"))
    assert_contains(
        line,
        f"the model pool mixes families: {mf.PRETRAINED} ('{models[mf.PRETRAINED]}') is a {kinds[0]}, "
        f"{other} ('{models[other]}') a {kinds[1]}",
    )
    assert_nothing_written(tmp_path, workdir)


@pytest.mark.parametrize("member", [mf.PRETRAINED, "dtd"])
def test_an_unsupported_family_in_the_merge_pool_is_one_error_line(member, pool, regnet, tmp_path, workdir, capsys):
    models = {**pool.models, member: str(regnet)}
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(tmp_path), models=models), capsys)
    assert_contains(line, f"checkpoint '{regnet}'", UNSUPPORTED)
    assert_nothing_written(tmp_path, workdir)


def test_a_pretrained_checkpoint_missing_backbone_weights_is_one_error_line(pool, tmp_path, workdir, capsys):
    copy = mf.copy_checkpoint(pool.models[mf.PRETRAINED], tmp_path / "pretrained")
    key = rewrite_backbone(copy, "missing")
    models = {**pool.models, mf.PRETRAINED: str(copy)}
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(tmp_path), models=models), capsys)
    assert_contains(line, f"checkpoint '{copy}'", "does not hold the backbone", key)
    assert_nothing_written(tmp_path, workdir)


# --- 4. AdaMerging coefficient files -------------------------------------------------------------


def coefficients_file(pool: Pool, path: Path, case: str) -> tuple[str, str]:
    """A layer-wise file with one bad entry (dtd's coefficient of a key): the text the error names."""
    write_coefficients(path, torch.full((2, len(pool.keys)), 0.3), MERGE_TASKS, pool.keys, "layer")
    content = json.loads(path.read_text())
    key = pool.keys[5]
    values = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "above the clamp range": 1.5,
              "below the clamp range": -0.25, "a string": "0.3", "null": None}  # fmt: skip
    if case == "a key the pool lacks":
        key = "convnext.encoder.stages.9.layers.0.pwconv1.weight"
        content["coefficients"]["dtd"][key] = 0.3
        expected = "which the model pool's backbone does not have"
    else:
        content["coefficients"]["dtd"][key] = values[case]
        expected = {"nan": "is nan, not finite", "inf": "is inf, not finite", "-inf": "is -inf, not finite",
                    "above the clamp range": "is 1.5, outside the clamp range [0, 1]",
                    "below the clamp range": "is -0.25, outside the clamp range [0, 1]",
                    "a string": "is '0.3', not a number", "null": "is None, not a number"}[case]  # fmt: skip
    path.write_text(json.dumps(content))  # json writes NaN and Infinity, as Python reads them
    return key, expected


ADAMERGING_CASES = ["nan", "inf", "-inf", "above the clamp range", "below the clamp range", "a key the pool lacks",
                    "a string", "null"]  # fmt: skip
LEARNED_CASES = ["nan", "-inf", "a key the pool lacks", "a string"]


@pytest.mark.parametrize("case", ADAMERGING_CASES)
def test_a_bad_adamerging_coefficients_file_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    path = tmp_path / "coefficients.json"
    key, expected = coefficients_file(pool, path, case)
    model = ["--model", "lightning_modules.adamerging.AdaMerging", "--model.coefficients", str(path),
             "--model.output_dir", str(tmp_path / "coefficients")]  # fmt: skip
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *model), capsys)
    assert_contains(line, f"coefficients file '{path}'", "dtd", f"'{key}'", expected)
    assert_nothing_written(tmp_path, workdir)


@pytest.mark.parametrize("case", LEARNED_CASES)
def test_a_bad_learned_coefficients_file_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    path = tmp_path / "coefficients.json"
    key, expected = coefficients_file(pool, path, case)
    method = ["--model.method", "merging.coefficients.LearnedCoefficients", "--model.method.coefficients", str(path)]
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(tmp_path, *method)), capsys)
    assert_contains(line, f"coefficients file '{path}'", "dtd", f"'{key}'", expected)
    assert_nothing_written(tmp_path, workdir)


def test_coefficients_outside_the_clamp_range_apply_where_no_range_is_enforced(pool, tmp_path):
    """LearnedCoefficients does not clamp, nor does AdaMerging with ``clamp: false``: 1.5 is applied."""
    path = tmp_path / "coefficients.json"
    write_coefficients(path, torch.full((2, 1), 1.5), MERGE_TASKS, pool.keys, "task")
    model_pool = ModelPool(pool.models)
    expected = merge_backbone(model_pool, TaskArithmetic(1.5), progress=False)
    learned = merge_backbone(model_pool, LearnedCoefficients(str(path)), progress=False)
    # theta_0 + 1.5 sum_t tau_t and theta_0 + sum_t 1.5 tau_t: two float32 evaluations of one formula.
    pretrained = mf.backbone(mf.load_state(pool.models[mf.PRETRAINED]))
    finetuned = [mf.backbone(mf.load_state(pool.models[task])) for task in MERGE_TASKS]
    for key, tensor in expected.items():
        bound = linear_merge_bound(pretrained[key], [model[key] - pretrained[key] for model in finetuned], 1.5)
        assert_within(learned[key], tensor, bound, key)
    classnames = {task: list(get_task(task).classnames) for task in MERGE_TASKS}
    unclamped = AdaMerging(list(MERGE_TASKS), classnames, pool.models, granularity="task", clamp=False, coefficients=str(path))
    assert torch.equal(unclamped.coefficients.detach(), torch.full((2, 1), 1.5))


# --- 5. staging directories of killed saves -------------------------------------------------------

SLOW_SAVE = """
import sys, time
from pathlib import Path
import torch
from transformers import ConvNextConfig
import merging.saved as saved

real_save_file = saved.save_file

def slow_save_file(tensors, path, metadata=None):
    real_save_file(tensors, path, metadata=metadata)
    print("writing", flush=True)
    time.sleep(600)

saved.save_file = slow_save_file
backbone = {"convnext.embeddings.patch_embeddings.weight": torch.zeros(8, 3, 4, 4)}
saved.save_merged(sys.argv[1], backbone, {}, ConvNextConfig(), None, {"method": "slow"})
"""


def start_slow_save(target: Path) -> subprocess.Popen:
    """A real ``save_merged`` in a subprocess, stopped mid-write (after the tensors, before the rest)."""
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(target)], stdout=subprocess.PIPE, text=True, env=mf.subprocess_env()
    )
    assert process.stdout.readline().strip() == "writing", "the writer died before writing"
    return process


def staging_dirs(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*"))


def test_the_next_save_removes_a_killed_saves_staging_but_never_a_live_ones(pool, tmp_path, workdir):
    target = tmp_path / "saved" / "merged"
    writer = start_slow_save(target)
    try:
        (live,) = staging_dirs(target)
        assert f".{writer.pid}@" in live.name and (live / "model.safetensors").is_file()
        # A concurrent save while the writer lives: its staging directory is left alone.
        save_merged(target, {}, {}, mf.tiny_config(["a", "b"]), None, {"method": "concurrent"})
        assert staging_dirs(target) == [live] and (target / "merge.json").is_file()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()  # reaped: a zombie still counts as a live process
    assert writer.returncode == -signal.SIGKILL and staging_dirs(target) == [live]

    model = merged_classifier(tmp_path, "--model.overwrite", "true", save_dir=target)
    merge_main([*merge_args(pool, tmp_path, *model), "--trainer.limit_test_batches", "0"])
    assert staging_dirs(target) == [], "the killed save's staging directory is still there"
    assert json.loads((target / "merge.json").read_text())["models"] == pool.models
    assert sorted(path.name for path in target.parent.iterdir()) == ["merged"]
    assert (tmp_path / "root" / "config.yaml").is_file()  # a run that was not refused records its config


def test_only_dead_writers_of_this_host_are_cleaned_up(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    target = tmp_path / "exports" / "out.v2"
    target.parent.mkdir()
    host = socket.gethostname()
    names = {
        "dead here": f".out.v2.{dead}@{host}.abcd1234",
        "alive here": f".out.v2.{os.getpid()}@{host}.efgh5678",
        "dead elsewhere": f".out.v2.{dead}@another-host.example.ijkl9012",
        "other target": f".out.{dead}@{host}.mnop3456",
    }
    for name in names.values():
        (target.parent / name).mkdir()
    remove_dead_staging(target)
    left = {path.name for path in target.parent.iterdir()}
    assert left == {names["alive here"], names["dead elsewhere"], names["other target"]}


# --- 6. configuration mistakes: one line with the choices, exit status 1 -------------------------

TRAIN_CONFIG_MISTAKES = {
    "an unknown option": (["--trainer.max_stepz", "10"], "unknown option --trainer.max_stepz; did you mean --trainer.max_steps?"),
    "an option's prefix": (["--trainer.max_step", "10"], "unknown option --trainer.max_step; did you mean --trainer.max_steps?"),
    "a misspelt top-level key": ({"modle": {"lr": 0.1}}, "unknown key 'modle.lr'; did you mean 'model.lr'?"),
    "a misspelt nested key": ({"model": {"lrr": 0.1}}, "unknown key 'model.lrr'; did you mean 'model.lr'?"),
    "not a number": (["--data.batch_size", "abc"], "error: data.batch_size: expected int, got 'abc'"),
    "not a choice": (["--data.val_split", "train"], "data.val_split: expected one of 'test', 'holdout', 'none', got 'train'"),
    "an unknown callback class": (
        {"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpointt"}]}},
        "trainer.callbacks: unknown class 'lightning.pytorch.callbacks.ModelCheckpointt'; did you mean ModelCheckpoint?",
    ),
}  # fmt: skip


def cli_or_yaml(mistake: list[str] | dict, tmp_path: Path) -> list[str]:
    """Command-line arguments as given, a dict as a YAML file passed with ``--config``."""
    if isinstance(mistake, list):
        return mistake
    path = tmp_path / "mistake.yaml"
    path.write_text(json.dumps(mistake))  # JSON is YAML
    return ["--config", str(path)]


@pytest.mark.parametrize("case", TRAIN_CONFIG_MISTAKES)
def test_a_train_config_mistake_is_one_error_line(case, convnext, tmp_path, workdir, capsys):
    mistake, expected = TRAIN_CONFIG_MISTAKES[case]
    args = train_args(convnext, tmp_path / "data", "digits", *cli_or_yaml(mistake, tmp_path))
    line = one_error_line(train_main, args, capsys)
    assert_contains(line, expected)
    assert not list(workdir.iterdir())


METHOD_NAMES = ", ".join(sorted({method.__name__ for method in METHODS.values()}))
MERGE_CONFIG_MISTAKES = {
    "a method name in the wrong case": (["--model.method", "Ties"], "model.method: unknown class 'Ties'; did you mean TiesMerging?"),
    "a registry name as method": (["--model.method", "task_arithmetic"], "model.method: unknown class 'task_arithmetic'; did you mean TaskArithmetic?"),
    "an unknown method option": (["--model.method", "TiesMerging", "--model.method.top_kk", "0.2"],
                                 "model.method: TiesMerging has no option 'top_kk'; did you mean 'top_k'?"),
    "an unknown model option": (["--model.save_dirr", "x"], "model: MergedClassifier has no option 'save_dirr'; did you mean 'save_dir'?"),
    "a misspelt top-level key": ({"modle": {"init_args": {"save_dir": "x"}}}, "unknown key 'modle.init_args.save_dir'; did you mean 'model.init_args.save_dir'?"),
}  # fmt: skip


@pytest.mark.parametrize("case", MERGE_CONFIG_MISTAKES)
def test_a_merge_config_mistake_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    mistake, expected = MERGE_CONFIG_MISTAKES[case]
    model = ["--model", "MergedClassifier", *cli_or_yaml(mistake, tmp_path)]
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *model), capsys)
    assert_contains(line, expected)
    if "unknown class" in expected:  # every method the registry holds, by the name users type
        assert_contains(line, f"(choose from {METHOD_NAMES})")
    assert_nothing_written(tmp_path, workdir)


@pytest.mark.parametrize("model", ["Merged", "merging.methods.NoSuchModel"])
def test_an_unknown_model_class_lists_the_model_classes(model, pool, tmp_path, workdir, capsys):
    line = one_error_line(merge_main, merge_args(pool, tmp_path, "--model", model), capsys)
    assert_contains(line, f"model: unknown class '{model}'")
    choices = line.split("(choose from ", 1)[1].rstrip(")").split(", ")
    assert {"AdaMerging", "MergedClassifier", "MethodComparison"} <= set(choices), line
    assert "MultiTaskEvaluation" not in choices and "LightningModule" not in choices
    assert_nothing_written(tmp_path, workdir)


@pytest.mark.parametrize("program", ["train", "merge"])
@pytest.mark.parametrize("flag", ["--help", "--print_config"])
def test_help_and_print_config_still_exit_0(program, flag, convnext, pool, tmp_path, workdir, capsys):
    main, args = (train_main, train_args(convnext, tmp_path, "digits")) if program == "train" else (
        merge_main, merge_args(pool, tmp_path, "--model", "MergedClassifier"))  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*args, flag])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert ("usage:" in out) if flag == "--help" else ("model:" in out and "trainer:" in out), out[:500]
    assert not list(workdir.iterdir())


# --- 7. numeric settings outside their domain: refused in __init__, before any model or data -------

TRAIN_SETTINGS = {
    "data.batch_size": ("0", "a positive integer"),
    "data.eval_batch_size": ("0", "a positive integer or null"),
    "data.num_workers": ("-1", "0 or more"),
    "model.lr": ("-0.01", "a positive number"),
    "model.momentum": ("-0.9", "0 or more"),
    "model.weight_decay": ("-0.0001", "0 or more"),
    "model.label_smoothing": ("1.0", "in [0, 1)"),
}


@pytest.mark.parametrize("option", TRAIN_SETTINGS)
def test_a_train_setting_outside_its_domain_is_one_error_line(option, convnext, tmp_path, workdir, capsys):
    value, domain = TRAIN_SETTINGS[option]
    data = write_dataset(small_dataset("mnist"), tmp_path / "mnist", "disk")
    line = one_error_line(train_main, train_args(convnext, data, "mnist", f"--{option}", value), capsys)
    assert line == f"error: {option} must be {domain}, got {float(value) if '.' in value else int(value)}"
    assert not list(workdir.iterdir())


MERGE_SETTINGS = {
    "data.batch_size": ("MergedClassifier", [], "0", "must be a positive integer, got 0"),
    "data.adaptation_batch_size": ("AdaMerging", [], "-4", "must be a positive integer, got -4"),
    "data.num_workers": ("MergedClassifier", [], "-1", "must be 0 or more, got -1"),
    "model.lr": ("AdaMerging", [], "0", "must be a positive number, got 0.0"),
    "model.clamp_min": ("AdaMerging", ["--model.clamp_max", "0.0"], "0.5", "must be finite and <= model.clamp_max (0.0), got 0.5"),
}  # fmt: skip


@pytest.mark.parametrize("option", MERGE_SETTINGS)
def test_a_merge_setting_outside_its_domain_is_one_error_line(option, pool, tmp_path, workdir, capsys):
    model, extra, value, expected = MERGE_SETTINGS[option]
    adamerging = ["--model", "AdaMerging", "--model.output_dir", str(tmp_path / "coefficients"), *extra]
    model_args = merged_classifier(tmp_path) if model == "MergedClassifier" else adamerging
    line = one_error_line(merge_main, [*merge_args(pool, tmp_path, *model_args), f"--{option}", value], capsys)
    assert line == f"error: {option} {expected}"
    assert_nothing_written(tmp_path, workdir)


# --- 8. output locations that cannot be written: refused before any work ---------------------------


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


def assert_no_leftovers(*directories: Path) -> None:
    """No directory made and removed by a check (or a half-written output) is left."""
    for directory in directories:
        assert [path.name for path in directory.iterdir() if path.name.startswith(".")] == [], directory


MERGE_OUTPUTS = {
    "save_dir under a file": ("MergedClassifier", "model.save_dir", "{file}/merged", "'{file}' is not a directory"),
    "save_dir under /proc": ("MergedClassifier", "model.save_dir", "/proc/convnext-fusion-none/merged",
                             "no new files in '/proc' ("),
    "report_dir is a file": ("MergedClassifier", "model.report_dir", "{file}", "'{file}' is not a directory"),
    "AdaMerging output_dir under a file": ("AdaMerging", "model.output_dir", "{file}/coefficients",
                                           "'{file}' is not a directory"),
}  # fmt: skip


@pytest.mark.parametrize("case", MERGE_OUTPUTS)
def test_a_merge_output_location_that_cannot_be_written_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    model, option, location, reason = MERGE_OUTPUTS[case]
    file = a_file(tmp_path)
    location, reason = location.format(file=file), reason.format(file=file)
    args = [*merge_args(pool, tmp_path, *merged_classifier(tmp_path)), f"--{option}", location]
    if model == "AdaMerging":  # fit: what writes the coefficients, after the last step
        args = ["fit", *merge_args(pool, tmp_path, "--model", model)[1:], "--trainer.max_steps", "1", f"--{option}", location]
    line = one_error_line(merge_main, args, capsys)
    assert line.startswith(f"error: {option} '{location}' cannot be written: {reason}"), line
    assert_nothing_written(tmp_path, workdir)
    assert file.read_text() == "not a directory"
    assert_no_leftovers(tmp_path, workdir)


def checkpoint_callback(dirpath: Path) -> dict:
    return {"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": str(dirpath)}}]}}  # fmt: skip


@pytest.mark.parametrize("case", ["export_dir under a file", "ModelCheckpoint dirpath under a file"])
def test_a_train_output_location_that_cannot_be_written_is_one_error_line(case, convnext, tmp_path, workdir, capsys):
    file = a_file(tmp_path)
    data = write_dataset(small_dataset("mnist"), tmp_path / "mnist", "disk")
    if case.startswith("export_dir"):
        option, location, extra = "export_dir", file / "exports", ["--export_dir", str(file / "exports")]
    else:
        option, location = "ModelCheckpoint dirpath", file / "checkpoints"
        extra = [*cli_or_yaml(checkpoint_callback(location), tmp_path), "--export_dir", str(tmp_path / "exports")]
    line = one_error_line(train_main, train_args(convnext, data, "mnist", *extra), capsys)
    assert line == f"error: {option} '{location}' cannot be written: '{file}' is not a directory"
    assert not list(workdir.iterdir()) and not (tmp_path / "exports").exists()
    assert file.read_text() == "not a directory"
    assert_no_leftovers(tmp_path)


def test_checking_an_output_location_creates_nothing(tmp_path):
    root = tmp_path / "outputs"
    root.mkdir()
    for path, atomic in ((root, False), (root / "new" / "nested", False), (root / "new" / "export", True)):
        check_output_location(path, "option", atomic=atomic)
    assert list(root.iterdir()) == []


# --- 9. resuming from a checkpoint that is not there ------------------------------------------------

RESUME_CASES = ["last, ModelCheckpoint dirpath", "last, default checkpoint directory", "a missing file"]


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resuming_without_a_checkpoint_is_one_error_line(case, convnext, tmp_path, workdir, capsys):
    data = write_dataset(small_dataset("mnist"), tmp_path / "mnist", "disk")
    extra = ["--ckpt_path", "last", "--export_dir", str(tmp_path / "exports")]
    if case == "last, ModelCheckpoint dirpath":
        extra += cli_or_yaml(checkpoint_callback(tmp_path / "checkpoints"), tmp_path)
        expected = f"(no last.ckpt in '{tmp_path / 'checkpoints'}')"
    elif case == "last, default checkpoint directory":
        expected = f"(no last.ckpt in '{workdir / 'checkpoints'}')"  # Lightning's default without a logger
    else:
        extra[1] = str(tmp_path / "checkpoints" / "last.ckpt")
        expected = f"--ckpt_path '{extra[1]}': no such checkpoint file"
    line = one_error_line(train_main, train_args(convnext, data, "mnist", *extra), capsys)
    assert_contains(line, expected)
    if case.startswith("last"):
        assert_contains(line, "error: --ckpt_path last: no checkpoint to resume from (", "leave it out to start from scratch")
    assert not list(workdir.iterdir()) and not (tmp_path / "exports").exists() and not (tmp_path / "checkpoints").exists()


def test_resuming_adamerging_without_a_checkpoint_is_one_error_line(pool, tmp_path, workdir, capsys):
    checkpoints = checkpoint_callback(tmp_path / "checkpoints")
    model = ["--model", "AdaMerging", "--model.output_dir", str(tmp_path / "coefficients")]
    args = ["fit", *merge_args(pool, tmp_path, *model)[1:], "--trainer.max_steps", "1", "--ckpt_path", "last"]
    line = one_error_line(merge_main, [*args, *cli_or_yaml(checkpoints, tmp_path)], capsys)
    assert line == (f"error: --ckpt_path last: no checkpoint to resume from (no last.ckpt in '{tmp_path / 'checkpoints'}'); "
                    "leave it out to start from scratch")  # fmt: skip
    assert_nothing_written(tmp_path, workdir)
    assert not (tmp_path / "checkpoints").exists()


# --- 10. a merge that would do nothing ----------------------------------------------------------------


NOTHING_DONE = {
    "MergedClassifier": (
        "no model.save_dir or model.export_dir is given: nothing would be done "
        "(give --model.save_dir or --model.export_dir to merge and write only)"
    ),
    "AdaMerging": "AdaMerging saves nothing: nothing would be done",
}


@pytest.mark.parametrize("model", NOTHING_DONE)
def test_limit_test_batches_0_with_nothing_to_save_is_one_error_line(model, pool, tmp_path, workdir, capsys):
    args = [*merge_args(pool, tmp_path, "--model", model), "--trainer.limit_test_batches", "0"]
    line = one_error_line(merge_main, args, capsys)
    assert line == f"error: trainer.limit_test_batches 0 evaluates nothing, and {NOTHING_DONE[model]}"
    assert_nothing_written(tmp_path, workdir)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["work"]
