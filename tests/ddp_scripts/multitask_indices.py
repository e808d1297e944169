"""Run MultiTaskDataModule's test loaders through ``Trainer.test`` and record the rows each process saw.

    python tests/ddp_scripts/multitask_indices.py OUT.json PROCESSOR DEVICES TASK=PATH [TASK=PATH ...]

Every test image is a constant grey square whose value is its row index (``tests/conftest.py``),
so the index is read back from the preprocessed tensor. Rank 0 writes, per task and per rank,
the ``[index, label]`` pairs seen.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer

from datamodules import MultiTaskDataModule  # the repository is on PYTHONPATH (the test sets it)


class IndexRecorder(LightningModule):
    """Decodes the row index of every test image, per task, and gathers them on rank 0."""

    def __init__(self, tasks: list[str], mean: float, std: float, out: str) -> None:
        super().__init__()
        self.tasks, self.mean, self.std, self.out = tasks, mean, std, out
        self.layer = torch.nn.Linear(1, 1)  # a parameter, so the strategy has something to wrap
        self.seen: dict[str, list[list[int]]] = {task: [] for task in tasks}

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        pixels, labels = batch
        values = torch.round((pixels[:, 0].mean(dim=(1, 2)) * self.std + self.mean) * 255)
        self.seen[self.tasks[dataloader_idx]] += [[int(v), int(y)] for v, y in zip(values, labels)]

    def on_test_epoch_end(self) -> None:
        gathered = [self.seen]
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, self.seen)
        if self.trainer.is_global_zero:
            result = {task: [rank[task] for rank in gathered] for task in self.tasks}
            Path(self.out).write_text(json.dumps({"world_size": self.trainer.world_size, "tasks": result}))


def run(out: str, processor: str, devices: int, paths: dict[str, str]) -> None:
    data = MultiTaskDataModule(list(paths), paths=paths, processor=processor, batch_size=8, num_workers=0)
    model = IndexRecorder(list(paths), data.preprocess.mean[0], data.preprocess.std[0], out)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(model, datamodule=data, verbose=False)


def main(argv: list[str]) -> None:
    out, processor, devices, *pairs = argv
    paths = dict(pair.split("=", 1) for pair in pairs)
    try:
        run(out, processor, int(devices), paths)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
