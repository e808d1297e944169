"""Every task's training config beyond the eight, rehearsed unchanged against stand-ins of its
real dataset (``tests/hf_home.py``: each under its real hub id and config, with its own split
names, columns, label type and class-name spellings).

One subprocess (``tests/train_each.py``) runs ``train.py fit --config configs/train/<task>.yaml``
for every task with ``HF_HOME`` pointed at the stand-ins and ``HF_HUB_OFFLINE=1``; only steps,
intervals, workers and the accelerator are overridden, never a model id or a data path, and the
outputs land in the working directory (a temporary folder). The eight are rehearsed by
``tests/test_reproduction.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hf_home
from conftest import REPO_ROOT
from datamodules.tasks import BENCHMARK_TASKS, FUSIONBENCH_TASKS, get_task
from lightning_modules.export import export_name

#: Every task with a training config that ``test_reproduction.py`` does not run.
NEW_TASKS = tuple(task for task in FUSIONBENCH_TASKS if task not in BENCHMARK_TASKS)
SIZES = {"train": 16, "test": 8}
TRAIN_ARGS = [
    "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.callbacks.every_n_train_steps=1",
    "--data.num_workers=0", "--trainer.accelerator=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained model and every new task's dataset under their real ids."""
    root = tmp_path_factory.mktemp("hf")
    hf_home.add_models(root / "home", tasks=())
    hf_home.add_datasets(root / "home", root / "scratch", SIZES, tasks=NEW_TASKS)
    return root / "home"


@pytest.fixture(scope="module")
def rehearsal(home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The working directory after every new task's config ran, and what the run printed."""
    cwd = tmp_path_factory.mktemp("rehearsal")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "train_each.py"), *NEW_TASKS, "--", *TRAIN_ARGS],
        cwd=cwd, env=hf_home.env(home), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return cwd, result.stdout


def test_every_training_config_is_rehearsed_here_or_by_the_reproduction() -> None:
    configs = {path.stem for path in (REPO_ROOT / "configs" / "train").glob("*.yaml")} - {"base"}
    assert set(NEW_TASKS) == configs - set(BENCHMARK_TASKS)


@pytest.mark.parametrize("task", NEW_TASKS)
def test_each_config_fine_tunes_its_task_and_exports_it(task: str, rehearsal: tuple[Path, str]) -> None:
    cwd, _ = rehearsal
    info = get_task(task)
    export = cwd / "exports" / export_name("facebook/convnext-base-224", info.hub_name, 64, 0.01, 1)
    config = json.loads((export / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(info.classnames)}
    card = (export / "README.md").read_text()
    for row in (
        f"| training split | {info.train_split} (every row) |",
        f"| training images | {SIZES['train']} |",
        f"| validation split | {info.test_split} |",
        "| steps | 1 |",
        f"- {info.hub_dataset}",
    ):
        assert row in card, (task, row)
    assert (cwd / "outputs" / "train" / task / "checkpoints" / "last.ckpt").exists()


def test_the_datasets_own_quirks_were_met(rehearsal: tuple[Path, str]) -> None:
    _, printed = rehearsal
    # food101 tests on `validation`, tiny_imagenet on `valid`: the model cards above say so.
    assert get_task("food101").test_split == "validation" and get_task("tiny_imagenet").test_split == "valid"
    # tiny_imagenet's WordNet ids match no class name: read by index, said once, on one line.
    said = [line for line in printed.splitlines() if "match none of the task's" in line]
    assert len(said) == 1, printed[-3000:]
    assert said[0].startswith("task 'tiny_imagenet', path 'zh-plus/tiny-imagenet', split 'train': ")
    assert "('n01443537', 'n01444537', 'n01445537', ...)" in said[0] and "labels are read by index" in said[0]
