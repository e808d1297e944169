"""Callbacks that the AdaMerging tests hand to ``merge.py fit`` (``--trainer.callbacks``).

They are importable as ``ddp_scripts.adamerging_steps.<Name>`` with ``tests/`` on the path,
in-process and in the DDP subprocesses alike. Each process appends one JSON line per step
to ``<directory>/rank<global rank>.jsonl``, so a test reads back what *every* rank held.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _describe(value: Any) -> Any:
    """The structure of a batch: container types, tensor dtypes and shapes, nothing else."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, dict):
        return {"dict": {str(key): _describe(item) for key, item in value.items()}}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_describe(item) for item in value]}
    return {"other": type(value).__name__}


class StepRecorder(Callback):
    """After every optimizer step: the coefficients as the callbacks (and checkpoints) see
    them, the step, the rank, the structure of the batch, a checksum of its images and the
    entropy as logged (what loggers and callbacks receive, after any sync over processes).

    Args:
        directory: where ``rank<r>.jsonl`` goes.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        images = {task: value for task, value in batch.items()} if isinstance(batch, dict) else {}
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "step": trainer.global_step,
            "coefficients": pl_module.coefficients.detach().cpu().tolist(),
            "batch": _describe(batch),
            "image_sums": {
                task: float(value.double().sum()) for task, value in images.items() if isinstance(value, torch.Tensor)
            },
            "loss": float(outputs["loss"]) if isinstance(outputs, dict) else None,
            "logged": {
                name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("train/entropy")
            },
        }
        with open(self.directory / f"rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")


class StopAfter(RuntimeError):
    """Raised by ``FailAtStep``: a run that dies part-way, as if killed."""


class FailAtStep(Callback):
    """End the run abruptly (an exception) once ``step`` optimizer steps are done.

    Args:
        step: the global step after which the run dies.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise StopAfter(f"stopped after step {trainer.global_step}")


def read_steps(directory: str | Path) -> dict[int, list[dict[str, Any]]]:
    """``{rank: [record per step, in order]}`` from a ``StepRecorder`` directory."""
    steps = {}
    for path in sorted(Path(directory).glob("rank*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        steps[records[0]["rank"]] = records
    return steps
