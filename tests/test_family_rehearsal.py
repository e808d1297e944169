"""Another family under its real hub id, rehearsed offline: ``microsoft/resnet-50``.

``tests/hf_home.py`` files a tiny ResNet under ``microsoft/resnet-50`` (with the hub checkpoint's
own image processor) and stand-ins of two tasks' datasets. As a user changes family, in one line,
two subprocesses with ``HF_HOME`` pointed there and ``HF_HUB_OFFLINE=1`` run

- ``train.py fit --config configs/train/<task>.yaml --model.model_name_or_path microsoft/resnet-50
  --data.processor microsoft/resnet-50`` for each task (``tests/train_each.py``), only steps,
  intervals, workers and the accelerator overridden, as ``tests/test_task_rehearsal.py`` does;
- ``merge.py test --config configs/merge/convnext-base-224_8-tasks.yaml`` with a pool of
  ``microsoft/resnet-50`` and the two exports (and those two tasks, the same processor).

The exports are ResNet classifiers named after the ResNet (config, head, card, processor), and
the merge scores every test image of both tasks once, with each task's own head.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

import hf_home
from conftest import PREPROCESSORS, REPO_ROOT
from datamodules.tasks import get_task
from lightning_modules.export import export_name

TASKS = ("eurosat", "dtd")
SIZES = {"train": 16, "test": 8}
CHANGE_FAMILY = [f"--model.model_name_or_path={hf_home.RESNET_ID}", f"--data.processor={hf_home.RESNET_ID}"]
TRAIN_ARGS = [
    "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.callbacks.every_n_train_steps=1",
    "--data.num_workers=0", "--trainer.accelerator=cpu",
]  # fmt: skip
MERGE_ARGS = ["--data.num_workers=0", "--trainer.accelerator=cpu"]


def run(command: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *command], cwd=cwd, env=hf_home.env(home), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory after both fine-tunes and the merge of their exports."""
    root = tmp_path_factory.mktemp("resnet-rehearsal")
    home = root / "home"
    hf_home.add_resnet(home)
    hf_home.add_datasets(home, root / "scratch", SIZES, tasks=TASKS)
    cwd = root / "work"
    cwd.mkdir()
    run([str(REPO_ROOT / "tests" / "train_each.py"), *TASKS, "--", *CHANGE_FAMILY, *TRAIN_ARGS], home, cwd)
    pool = {"_pretrained_": hf_home.RESNET_ID, **{task: str(export_of(cwd, task)) for task in TASKS}}
    (cwd / "pool.yaml").write_text(yaml.safe_dump({"models": pool}))
    run([
        str(REPO_ROOT / "merge.py"), "test", "--config", str(REPO_ROOT / "configs" / "merge" / "convnext-base-224_8-tasks.yaml"),
        "--model.init_args.models", "pool.yaml", "--data.tasks", json.dumps(list(TASKS)),
        f"--data.processor={hf_home.RESNET_ID}", *MERGE_ARGS,
    ], home, cwd)  # fmt: skip
    return cwd


def export_of(cwd: Path, task: str) -> Path:
    return cwd / "exports" / export_name(hf_home.RESNET_ID, get_task(task).hub_name, 64, 0.01, 1)


@pytest.mark.parametrize("task", TASKS)
def test_each_export_is_a_resnet_classifier_of_its_task(task: str, rehearsal: Path) -> None:
    export = export_of(rehearsal, task)
    assert export.name == f"resnet-50_{get_task(task).hub_name}_sgd_batch-size-64_lr-0.01_steps-1"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "resnet" and config["architectures"] == ["ResNetForImageClassification"]
    classnames = get_task(task).classnames
    assert config["id2label"] == {str(i): name for i, name in enumerate(classnames)}
    with safe_open(export / "model.safetensors", "pt") as weights:
        # ResNet's head is Sequential(Flatten, Linear): classifier.1, on the last stage's 16 channels.
        assert weights.get_slice("classifier.1.weight").get_shape() == [len(classnames), 16]
        assert weights.get_slice("classifier.1.bias").get_shape() == [len(classnames)]
        assert not any(key.startswith("convnext.") for key in weights.keys())
        assert any(key.endswith("running_mean") for key in weights.keys())
    card = (export / "README.md").read_text()
    for row in (
        f"base_model: {hf_home.RESNET_ID}",
        f"| training split | {get_task(task).train_split} (every row) |",
        f"| training images | {SIZES['train']} |",
        "| steps | 1 |",
    ):
        assert row in card, (task, row)
    # The hub checkpoint's processor, carried over: what the export's users preprocess with.
    processor = json.loads((export / "preprocessor_config.json").read_text())
    hub = PREPROCESSORS["resnet"]
    assert processor["crop_pct"] == hub["crop_pct"] == 0.875 and processor["resample"] == hub["resample"] == 3
    assert processor["image_processor_type"] == "ConvNextImageProcessor" and processor["size"] == {"shortest_edge": 224}
    assert hub["feature_extractor_type"] == "ConvNextFeatureExtractor" and hub["size"] == 224  # the same, in the 2022 format
    assert processor["image_mean"] == hub["image_mean"] and processor["image_std"] == hub["image_std"]


def test_the_merge_of_the_two_exports_scores_every_test_image_once(rehearsal: Path) -> None:
    directory = rehearsal / "outputs" / "merge" / "convnext-base-224_8-tasks"
    content = json.loads((directory / "report.json").read_text())
    assert list(content["rows"]) == ["simple_average"]
    row = content["rows"]["simple_average"]
    assert list(row["tasks"]) == list(TASKS)
    assert [values["num_samples"] for values in row["tasks"].values()] == [SIZES["test"]] * len(TASKS)
    assert "partial" not in content
    assert content["models"] == {"_pretrained_": hf_home.RESNET_ID, **{task: str(export_of(rehearsal, task)) for task in TASKS}}
