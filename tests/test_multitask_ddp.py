"""MultiTaskDataModule's test loaders under real DDP on 2 CPU processes: every sample exactly once."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Trainer

from conftest import REPO_ROOT, index_dataset, write_dataset
from datamodules import DataError, MultiTaskDataModule
from datamodules.tasks import TASKS

SCRIPT = REPO_ROOT / "tests" / "ddp_scripts" / "multitask_indices.py"
# Odd sizes: the two ranks get unequal shares, the case where padding would repeat samples.
TEST_SIZES = {"dtd": 101, "eurosat": 57}


@pytest.fixture(scope="module")
def task_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multitask")
    return {
        task: write_dataset(index_dataset({"test": size}, TASKS[task].classnames), root / task, "disk")
        for task, size in TEST_SIZES.items()
    }


def expected_rows(task: str) -> list[list[int]]:
    return [[i, i % TASKS[task].num_classes] for i in range(TEST_SIZES[task])]


def load_script():
    spec = importlib.util.spec_from_file_location("multitask_indices", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_see_every_test_sample_once(task_paths, tiny_processor, tmp_path):
    out = tmp_path / "ddp.json"
    pairs = [f"{task}={path}" for task, path in task_paths.items()]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), tiny_processor, "2", *pairs],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert list(report["tasks"]) == list(TEST_SIZES)
    for task, per_rank in report["tasks"].items():
        assert len(per_rank) == 2
        counts = sorted(len(rows) for rows in per_rank)
        assert counts == [TEST_SIZES[task] // 2, TEST_SIZES[task] // 2 + 1], f"{task}: shares {counts}"
        seen = sorted(row for rows in per_rank for row in rows)
        assert seen == expected_rows(task), f"{task}: a row is missing or seen twice"


def test_one_process_sees_the_same_set(task_paths, tiny_processor, tmp_path):
    out = tmp_path / "single.json"
    load_script().run(str(out), tiny_processor, 1, task_paths)
    report = json.loads(out.read_text())
    assert report["world_size"] == 1
    for task, (rows,) in report["tasks"].items():
        assert rows == expected_rows(task), f"{task}: one process must see every row, in order"


def test_adaptation_loader_gives_unlabelled_images(task_paths, tiny_processor, decode_index):
    data = MultiTaskDataModule(list(task_paths), paths=task_paths, processor=tiny_processor, num_workers=0)
    assert [len(loader.dataset) for loader in data.test_dataloader()] == list(TEST_SIZES.values())
    with pytest.raises(DataError, match="max_steps"):
        data.train_dataloader()
    data.trainer = Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False)
    loaders = data.train_dataloader().iterables
    assert list(loaders) == list(TEST_SIZES)
    for task, loader in loaders.items():
        batches = list(loader)
        assert len(batches) == 3
        for batch in batches:  # images only: the label column is gone
            assert isinstance(batch, torch.Tensor) and batch.shape == (16, 3, 32, 32)
        seen = [decode_index(image) for batch in batches for image in batch]
        assert all(0 <= index < TEST_SIZES[task] for index in seen)
        assert len(set(seen[: TEST_SIZES[task]])) == min(len(seen), TEST_SIZES[task])
