"""The LightningCLI subclasses behind ``train.py`` and ``merge.py``."""

from __future__ import annotations

import gc
import os
import sys
import typing
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, OnExceptionCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from common.errors import CheckpointError
from common.files import check_output_location
from datamodules.errors import DataError
from lightning_modules.errors import TrainingError
from lightning_modules.evaluation import MultiTaskEvaluation
from lightning_modules.export import HuggingFaceExport
from lightning_modules.noise import silence_known_noise
from lightning_modules.parser_errors import ProjectArgumentParser
from lightning_modules.resume import check_given_checkpoint, check_resume_file, one_last_checkpoint
from merging.errors import MergeError

#: Errors that mean bad input: reported as one line, without a traceback.
INPUT_ERRORS = (DataError, CheckpointError, MergeError, TrainingError)

#: Trainer options where an int counts (batches, steps) and a float is a fraction.
COUNT_OR_FRACTION = (
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "val_check_interval", "overfit_batches",
)  # fmt: skip


def read_integers_as_counts(parser: Any) -> None:
    """``--trainer.limit_test_batches 1`` is one batch and ``1.0`` all of them, whatever else
    was imported. Lightning types these options ``Optional[Union[int, float]]``, but typing
    caches unions by equality (``Union[int, float] == Union[float, int]``), so the union
    jsonargparse ends up with can be float first, depending on which libraries built which
    union first (Lightning itself annotates ``Union[float, int]``): ``1`` then reads as ``1.0``,
    every batch. Seen once one more merge method and the test fixtures' libraries were imported
    before parsing (``tests/test_merge_cli.py`` runs that case). Each option gets an int-first
    union built outside the cache: jsonargparse tries a union's types in order. (Private
    attributes of jsonargparse and typing, pinned by that test.)"""
    for action in parser._actions:
        typehint = getattr(action, "_typehint", None)
        if action.dest.removeprefix("trainer.") in COUNT_OR_FRACTION and typing.get_origin(typehint) is typing.Union:
            members = tuple(sorted(typehint.__args__, key=lambda member: member is not int))
            action._typehint = typing._UnionGenericAlias(typing.Union, members)


def _input_error(error: BaseException | None) -> BaseException | None:
    """The input error behind ``error``: jsonargparse wraps one raised while instantiating a
    subclass (``--model MergedClassifier``) in a ValueError of its own, ``from`` the original."""
    while error is not None:
        if isinstance(error, INPUT_ERRORS):
            return error
        error = error.__cause__
    return None


class SaveConfigAfterModelSetup(SaveConfigCallback):
    """``config.yaml`` written once the model's setup has passed: Lightning runs the callbacks'
    setup first, and a merge refused in the model's setup (a checkpoint that is not a ConvNeXt)
    would leave the file of a run that never ran. The model's setup is idempotent here
    (``MultiTaskEvaluation`` builds once), so Lightning calling it again right after is a no-op.
    Bad input found mid-run (an image broken inside, found only when it is decoded) takes the
    file back, and the log folder it made for it: nothing is left of the refused run."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pl_module.setup(stage)
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir  # every rank asks (a broadcast); rank 0 writes
            self._written = (os.path.join(log_dir, self.config_filename), log_dir, not get_filesystem(log_dir).isdir(log_dir))
        super().setup(trainer, pl_module, stage)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        written = getattr(self, "_written", None)
        if written is None or _input_error(exception) is None or not trainer.is_global_zero:
            return
        path, log_dir, made_log_dir = written
        fs = get_filesystem(log_dir)
        if fs.isfile(path):
            fs.rm(path)
        if made_log_dir and not fs.ls(log_dir):
            fs.rmdir(log_dir)


class ProjectCLI(LightningCLI):
    """Bad input (a configuration mistake the parser finds, or an input error raised while
    building the classes) ends the program with one ``error:`` line and exit status 1; the
    process group is torn down at the end so CPU DDP runs exit cleanly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._froze_startup_objects = False
        silence_known_noise()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", ProjectArgumentParser)
        kwargs.setdefault("save_config_callback", SaveConfigAfterModelSetup)
        try:
            super().__init__(*args, **kwargs)
        except Exception as error:
            cause = _input_error(error)
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            if self._froze_startup_objects:  # collectable again for whoever called main() in-process
                gc.unfreeze()

    def add_arguments_to_parser(self, parser: Any) -> None:
        read_integers_as_counts(parser)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        check_given_checkpoint(self.config)  # before LightningCLI reads the file's hyper-parameters

    def subcommand_config(self) -> Any:
        return self.config.get(str(self.subcommand), self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """``--trainer.enable_progress_bar false`` also drops a progress bar the config lists (the
        shipped training configs list a cheap one), which Lightning would refuse as a contradiction.
        A ``ModelCheckpoint`` without a ``dirpath`` writes to ``<trainer.default_root_dir>/checkpoints``
        whatever the logger (Lightning would put it under the logger's run, a new folder per W&B run,
        where ``--ckpt_path last`` could never find it): one base config serves every task."""
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("enable_progress_bar") is False:
            callbacks = trainer.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            trainer["callbacks"] = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
        instance = super().instantiate_trainer(**kwargs)
        for callback in instance.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = default_checkpoint_dir(instance.default_root_dir)
        return instance

    def freeze_startup_objects(self) -> None:
        """Take the objects alive before the loops (about 500,000: the imports and the configuration)
        out of the garbage collector's view. Each full collection in a loop would walk them all again
        (0.3 s each on 2 busy cores, a quarter of a 10,000-image test loop at 32 px), and in the
        DataLoader workers forked later it would write to their pages (copy-on-write). Not collected
        first: the few cycles that are garbage now stay until the run ends (unfrozen then)."""
        if gc.get_freeze_count() == 0:  # a caller's own freeze is left as it is
            gc.freeze()
            self._froze_startup_objects = True

    def before_fit(self) -> None:
        check_resume_checkpoint(self.trainer, self.subcommand_config().get("ckpt_path"), self.model)
        self.freeze_startup_objects()

    def before_test(self) -> None:
        self.freeze_startup_objects()


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
        local = "://" not in ckpt_path and not ckpt_path.startswith("registry")
        if local and not Path(ckpt_path).is_file():
            raise CheckpointError(f"--ckpt_path '{ckpt_path}': no such checkpoint file")
        if local:
            check_resume_file(ckpt_path, model, ckpt_path)
        return
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    found = {path for callback in callbacks for path in callback._find_last_checkpoints(trainer)}
    found |= {c.ckpt_path for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)}
    if (last := one_last_checkpoint(found)) is not None:
        check_resume_file(last, model, ckpt_path)
        return
    # Where Lightning looks: dirpath, else under the logger's or the trainer's root.
    places = [f"'{callback._ModelCheckpoint__resolve_ckpt_dir(trainer)}'" for callback in callbacks]
    where = f"no last.ckpt in {', '.join(places)}" if places else "checkpointing is off"
    raise CheckpointError(f"--ckpt_path last: no checkpoint to resume from ({where}); leave it out to start from scratch")


class TrainCLI(ProjectCLI):
    """``train.py``: the DataModule tells the model its classes; ``fit`` ends with a Hugging Face export."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classnames", "model.classnames", apply_on="instantiate")
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default="exports",
            help="Root for the Hugging Face export written at the end of fit (null: no export).",
        )
        parser.add_argument(
            "--export_name",
            type=str | None,
            default=None,
            help="Name of the export directory (default: <model>_<task>_sgd_batch-size-<B>_lr-<lr>_steps-<N>).",
        )
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing export.")

    def before_fit(self) -> None:
        super().before_fit()
        if not self.trainer.loggers:
            # `--trainer.logger false` on a config with a LearningRateMonitor: nothing to monitor into,
            # and Lightning would refuse to train.
            self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        config = self.subcommand_config()
        if config.get("export_dir") is not None:
            export = HuggingFaceExport(
                config["export_dir"],
                config.get("export_name"),
                config.get("overwrite"),
                config_yaml=self._parser(self.subcommand).dump(config, skip_none=False),
            )
            # Before any data is read (its own setup check comes after the data's setup).
            export.check(self.trainer, self.model, self.datamodule)
            self.trainer.callbacks.append(export)
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is not None:
                check_output_location(callback.dirpath, f"{type(callback).__name__} dirpath")


class MergeCLI(ProjectCLI):
    """``merge.py``: the DataModule tells the model which tasks, in which order, with which labels."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.task_names", "model.init_args.tasks", apply_on="instantiate")
        parser.link_arguments("data.classnames", "model.init_args.classnames", apply_on="instantiate")
        parser.link_arguments("data.splits", "model.init_args.splits", apply_on="instantiate")

    def before_test(self) -> None:
        # Here and not only in the model's setup: Lightning writes config.yaml before that.
        if isinstance(self.model, MultiTaskEvaluation):
            self.model.check_test_does_something(self.trainer)
        super().before_test()
