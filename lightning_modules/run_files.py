"""What a CLI run leaves in ``trainer.default_root_dir``: its ``config.yaml``, only for a run that
did not fail, and its checkpoints, where ``--ckpt_path last`` looks for them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from common.errors import CheckpointError
from lightning_modules.resume import check_resume_file, is_local, one_last_checkpoint


class SaveConfigOfCompletedRuns(SaveConfigCallback):
    """Lightning's ``config.yaml``, taken back if the run fails: a run refused after the file was
    written (a pool checkpoint of no supported family, found in the model's setup; AdaMerging
    without ``max_steps`` or a training set smaller than one batch, found when Lightning asks for
    the loaders) leaves none, as the README promises, and the file an earlier run left there is
    put back. Lightning calls ``on_exception`` for any exception inside fit, validate or test."""

    #: Puts the file back as it was before this run wrote it (rank 0, once written).
    undo: Callable[[], None] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.save_to_log_dir and not self.already_saved:
            log_dir = trainer.log_dir  # on every rank: it broadcasts
            if trainer.is_global_zero:
                self.undo = undo_writing(os.path.join(log_dir, self.config_filename))
        super().setup(trainer, pl_module, stage)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.undo is not None:
            self.undo()
            self.undo = None


def undo_writing(path: str) -> Callable[[], None]:
    """A function that puts ``path`` and its missing parent folders back as they are now."""
    fs = get_filesystem(path)
    before = fs.cat_file(path) if fs.isfile(path) else None
    missing, folder = [], os.path.dirname(path)
    while folder and not fs.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)

    def undo() -> None:
        if before is not None:
            fs.pipe_file(path, before)
        elif fs.exists(path):
            fs.rm(path)
        for created in missing:  # innermost first; one that now holds other files stays
            if fs.isdir(created) and not fs.ls(created):
                fs.rmdir(created)

    return undo


def default_checkpoint_dir(default_root_dir: str) -> str:
    """Where a ``ModelCheckpoint`` without ``dirpath`` writes (``ProjectCLI.instantiate_trainer``);
    a local folder made absolute, as ``ModelCheckpoint`` makes its own ``dirpath``."""
    if "://" in default_root_dir:
        return default_root_dir.rstrip("/") + "/checkpoints"
    return os.path.realpath(os.path.join(os.path.expanduser(default_root_dir), "checkpoints"))


def check_resume_checkpoint(trainer: Any, ckpt_path: str | None, model: Any = None) -> None:
    """``--ckpt_path last`` with no last checkpoint: Lightning only warns and trains from scratch,
    which a resumed run must not silently do. Found as Lightning finds it when fit starts; the
    file found (one, loadable, the model's: ``lightning_modules/resume.py``) checked too."""
    if ckpt_path in (None, "best", "hpc"):
        return
    if ckpt_path != "last":
        local = is_local(ckpt_path)
        if local and not Path(ckpt_path).is_file():
            raise CheckpointError(f"--ckpt_path '{ckpt_path}': no such checkpoint file")
        if local:
            check_resume_file(ckpt_path, model, ckpt_path)
        return
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    found = {path for callback in callbacks for path in last_checkpoints(callback, trainer)}
    found |= {c.ckpt_path for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)}
    if (last := one_last_checkpoint(found)) is not None:
        check_resume_file(last, model, ckpt_path)
        return
    places = [f"'{checkpoint_dir(callback, trainer)}'" for callback in callbacks]
    where = f"no last.ckpt in {', '.join(places)}" if places else "checkpointing is off"
    raise CheckpointError(f"--ckpt_path last: no checkpoint to resume from ({where}); leave it out to start from scratch")


def checkpoint_dir(callback: ModelCheckpoint, trainer: Any) -> str:
    """Where ``callback`` writes: its ``dirpath``, which ``ProjectCLI.instantiate_trainer`` sets
    for every ``ModelCheckpoint`` without one."""
    return callback.dirpath or default_checkpoint_dir(trainer.default_root_dir)


def last_checkpoints(callback: ModelCheckpoint, trainer: Any) -> set[str]:
    """The files ``--ckpt_path last`` resumes from, found as Lightning finds them: in the
    callback's folder, named ``last`` (``last-v1``, ...) with the checkpoint extension."""
    folder = checkpoint_dir(callback, trainer)
    fs = get_filesystem(folder)
    if not fs.isdir(folder):
        return set()
    names = {os.path.normpath(path) for path in fs.ls(folder, detail=False)}
    return {
        path
        for path in names
        if Path(path).suffix == callback.FILE_EXTENSION and Path(path).stem.startswith(callback.CHECKPOINT_NAME_LAST)
    }
