"""Callbacks that tests add to ``train.py`` (and ``merge.py``) runs with ``--trainer.callbacks+=train_cli_callbacks.<Name>``.

This directory must be on ``sys.path`` (pytest's ``pythonpath`` setting puts it there, and
``tests/test_train_cli.py`` on ``PYTHONPATH`` for subprocesses).
"""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

#: What ``Record`` saw in the last in-process run.
RECORDED: dict[str, Any] = {}


class KillAfterFirstCheckpoint(Callback):
    """SIGKILLs its own process at the start of the first step after a checkpoint file exists:
    a crash at a known point, with no chance for Lightning to clean up or save anything."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if any(Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")):
            os.kill(os.getpid(), signal.SIGKILL)


class Record(Callback):
    """Keeps the trained module, the step training started from and the metrics of validate/test."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        RECORDED["first_step"] = trainer.global_step

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        RECORDED["module"] = pl_module
        RECORDED["checkpoint_dirs"] = [callback.dirpath for callback in trainer.checkpoint_callbacks]
        RECORDED["default_root_dir"] = trainer.default_root_dir

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        RECORDED["validate"] = {key: float(value) for key, value in trainer.callback_metrics.items()}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        RECORDED["test"] = {key: float(value) for key, value in trainer.callback_metrics.items()}


class RecordTrainingRows(Callback):
    """Keeps every training batch's images, to read back which rows training saw."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        RECORDED.setdefault("train_images", []).append(batch[0].clone())


class CheckModes(Callback):
    """Runs the model twice on the batch at hand, in whatever mode Lightning's loop left it,
    and keeps whether the two outputs were equal and whether any module was in eval mode."""

    def _check(self, stage: str, pl_module: LightningModule, batch: Any) -> None:
        import torch

        with torch.no_grad():
            first, second = pl_module(batch[0]), pl_module(batch[0])
        modes = {module.training for module in pl_module.modules()}
        RECORDED.setdefault(stage, []).append({"equal": bool(torch.equal(first, second)), "modes": modes})

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._check("train_forwards", pl_module, batch)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._check("val_forwards", pl_module, batch)


class RecordFrozen(Callback):
    """Keeps how many objects the garbage collector had frozen when the fit or test loop started."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        RECORDED["frozen_at_fit"] = gc.get_freeze_count()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        RECORDED["frozen_at_test"] = gc.get_freeze_count()
