"""What the rehearsals of the reference configs share: running a command as a user runs it, in a
subprocess against a Hugging Face home of stand-ins (``tests/hf_home.py``), and reading its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hf_home
from conftest import REPO_ROOT
from datamodules.tasks import BENCHMARK_TASKS

SIZES = {"train": 64, "test": 8}  # one global batch of train rows: the README's examples draw one
MERGE = str(REPO_ROOT / "merge.py")
MERGE_ARGS = ["--trainer.max_steps=2", "--data.num_workers=0", "--trainer.accelerator=cpu"]


def run(command: list[str], home: Path, cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *command], cwd=cwd, env=hf_home.env(home, **env), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


def assert_full_report(content: dict, rows: set[str], tasks=BENCHMARK_TASKS, sizes=SIZES) -> None:
    assert set(content["rows"]) == rows
    for row in content["rows"].values():
        assert list(row["tasks"]) == list(tasks)
        assert all(values["num_samples"] == sizes["test"] for values in row["tasks"].values())
    assert "partial" not in content
