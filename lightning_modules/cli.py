"""The LightningCLI subclasses behind ``train.py`` and ``merge.py``."""

from __future__ import annotations

import contextvars
import functools
import gc
import inspect
import operator
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, OnExceptionCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from common.errors import CheckpointError
from common.files import check_output_location
from datamodules.errors import DataError
from datamodules.loaders import OWN_SAMPLING, check_split_over_devices
from lightning_modules.errors import TrainingError
from lightning_modules.evaluation import MultiTaskEvaluation
from lightning_modules.export import HuggingFaceExport
from lightning_modules.noise import silence_known_noise
from lightning_modules.parser_errors import ProjectArgumentParser
from lightning_modules.versions import UnverifiedVersionError, check_verified_versions
from merging.errors import MergeError

#: Errors that mean bad input (or an installation outside the verified versions): reported as
#: one line, without a traceback.
INPUT_ERRORS = (DataError, CheckpointError, MergeError, TrainingError, UnverifiedVersionError)

#: Trainer options where an int counts (batches, steps) and a float is a fraction.
COUNT_OR_FRACTION = (
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "val_check_interval", "overfit_batches",
)  # fmt: skip


#: Help of the options above (Lightning's own is replaced with the type it documents).
COUNT_OR_FRACTION_HELP = {
    "limit_train_batches": "How much of the training data to use: an int counts batches, a float is a fraction.",
    "limit_val_batches": "How much of the validation data to use: an int counts batches, a float is a fraction.",
    "limit_test_batches": "How much of the test data to use: an int counts batches, a float is a fraction.",
    "limit_predict_batches": "How much of the prediction data to use: an int counts batches, a float is a fraction.",
    "overfit_batches": "Train and validate on this much of the training data: an int counts batches, a float is a fraction.",
    "val_check_interval": "How often to validate within a training epoch: an int counts batches, a float is a fraction "
    "of the epoch (also a duration: a string, timedelta or dict).",
}


def int_first(hint: Any) -> Any:
    """``hint``, a union, as a ``types.UnionType`` with ``int`` first. Lightning types the options
    of ``COUNT_OR_FRACTION`` ``Optional[Union[int, float]]``, but typing caches unions by equality
    (``Union[int, float] == Union[float, int]``), so the union it hands out can be float first,
    depending on which libraries built which union first (Lightning itself annotates
    ``Union[float, int]``), and jsonargparse, which tries a union's types in order, then reads
    ``--trainer.limit_test_batches 1`` as ``1.0``: every batch. Seen once one more merge method and
    the test fixtures' libraries were imported before parsing (``tests/test_merge_cli.py``). A
    ``types.UnionType`` (``int | float``) is built anew, in the order given, outside that cache."""
    members = sorted(typing.get_args(hint), key=lambda member: member is not int)
    return functools.reduce(operator.or_, members)


def add_trainer_arguments(parser: Any, trainer_class: type) -> None:
    """The Trainer's options under ``trainer.`` as LightningCLI adds them, but for the count-or-fraction
    ones, typed ``int`` first (``int_first``) in the same group."""
    parser.add_class_arguments(
        trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip=set(COUNT_OR_FRACTION)
    )
    parameters = inspect.signature(trainer_class.__init__).parameters
    for name in COUNT_OR_FRACTION:
        parser.groups["trainer"].add_argument(
            f"--trainer.{name}",
            type=int_first(parameters[name].annotation),
            default=parameters[name].default,
            help=COUNT_OR_FRACTION_HELP[name],
        )


def _input_error(error: BaseException | None) -> BaseException | None:
    """The input error behind ``error``: jsonargparse wraps one raised while instantiating a
    subclass (``--model MergedClassifier``) in a ValueError of its own, ``from`` the original."""
    while error is not None:
        if isinstance(error, INPUT_ERRORS):
            return error
        error = error.__cause__
    return None


class SaveConfigOfCompletedRuns(SaveConfigCallback):
    """Lightning's ``config.yaml``, taken back if the run fails: a run refused after the file was
    written (a checkpoint that is not a ConvNeXt, found in the model's setup; a label that is not a
    class, found by the data's) leaves none, as the README promises, and the file an earlier run
    left there is put back. Lightning calls ``on_exception`` for any exception inside fit or test."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.save_to_log_dir and not self.already_saved:
            log_dir = trainer.log_dir  # on every rank: it broadcasts
            if trainer.is_global_zero:
                self.undo = undo_writing(os.path.join(log_dir, self.config_filename))
        super().setup(trainer, pl_module, stage)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if getattr(self, "undo", None) is not None:
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


class ProjectCLI(LightningCLI):
    """Bad input (a configuration mistake the parser finds, or an input error raised while
    building the classes) ends the program with one ``error:`` line and exit status 1; the
    process group is torn down at the end so CPU DDP runs exit cleanly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._froze_startup_objects = False
        silence_known_noise()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", ProjectArgumentParser)
        kwargs.setdefault("save_config_callback", SaveConfigOfCompletedRuns)
        # The models configure their own optimizer (the recipe's SGD, AdaMerging's Adam), from their options.
        kwargs.setdefault("auto_configure_optimizers", False)
        try:
            check_verified_versions()
            # In a context of its own: jsonargparse leaves its last subclass parser in a context
            # variable, which would keep this run (its model, the pool's open checkpoints) alive
            # after main() returns, until the next in-process run.
            contextvars.copy_context().run(super().__init__, *args, **kwargs)
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

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        """The model's and the data's options, then the Trainer's (``add_trainer_arguments``): in
        that order in ``--help`` too, so the project's own come first."""
        parser.add_lightning_class_args(self.model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self.datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        add_trainer_arguments(parser, self.trainer_class)
        parser.set_defaults({f"trainer.{key}": value for key, value in self.trainer_defaults.items() if key != "callbacks"})

    def subcommand_config(self) -> Any:
        return self.config.get(str(self.subcommand), self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """``--trainer.enable_progress_bar false`` also drops a progress bar the config lists (the
        shipped training configs list a cheap one), which Lightning would refuse as a contradiction.
        A ``ModelCheckpoint`` without a ``dirpath`` writes to ``<trainer.default_root_dir>/checkpoints``
        whatever the logger (Lightning would put it under the logger's run, a new folder per W&B run,
        where ``--ckpt_path last`` could never find it): one base config serves every task."""
        trainer = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
        if trainer.get("enable_progress_bar") is False:
            callbacks = trainer.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kwargs["callbacks"] = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
        instance = super().instantiate_trainer(**kwargs)
        for callback in instance.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = default_checkpoint_dir(instance.default_root_dir)
        return instance

    def check_before_launch(self) -> None:
        """What depends on the number of processes, refused here, before Lightning starts them
        (each would print the same error)."""
        if self.subcommand == "fit" and self.trainer.world_size > 1 and self.subcommand_config().trainer.use_distributed_sampler:
            raise DataError(OWN_SAMPLING)

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
        self.check_before_launch()
        check_resume_checkpoint(self.trainer, self.subcommand_config().get("ckpt_path"))
        self.freeze_startup_objects()

    def before_validate(self) -> None:
        self.check_before_launch()
        self.freeze_startup_objects()

    def before_test(self) -> None:
        self.check_before_launch()
        self.freeze_startup_objects()


def default_checkpoint_dir(default_root_dir: str) -> str:
    """Where a ``ModelCheckpoint`` without ``dirpath`` writes (``ProjectCLI.instantiate_trainer``);
    a local folder made absolute, as ``ModelCheckpoint`` makes its own ``dirpath``."""
    if "://" in default_root_dir:
        return default_root_dir.rstrip("/") + "/checkpoints"
    return os.path.realpath(os.path.join(os.path.expanduser(default_root_dir), "checkpoints"))


def check_resume_checkpoint(trainer: Any, ckpt_path: str | None) -> None:
    """``--ckpt_path last`` with no last checkpoint: Lightning only warns and trains from scratch,
    which a resumed run must not silently do. Found as Lightning finds it when fit starts."""
    if ckpt_path in (None, "best", "hpc"):
        return
    if ckpt_path != "last":
        local = "://" not in ckpt_path and not ckpt_path.startswith("registry")
        if local and not Path(ckpt_path).is_file():
            raise CheckpointError(f"--ckpt_path '{ckpt_path}': no such checkpoint file")
        return
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    found = {path for callback in callbacks for path in last_checkpoints(callback, trainer)}
    found |= {c.ckpt_path for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)}
    if any(Path(path).is_file() for path in found):
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


class TrainCLI(ProjectCLI):
    """``train.py``: the DataModule tells the model its classes; ``fit`` ends with a Hugging Face export."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (the classifier has no ``predict_step``)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

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

    def check_before_launch(self) -> None:
        super().check_before_launch()
        if self.subcommand == "fit":
            accumulate = self.trainer.accumulate_grad_batches
            check_split_over_devices(self.datamodule.batch_size, self.trainer, "data.batch_size", accumulate)

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
                config_yaml=self.parser.subcommand_parsers[self.subcommand].dump(config, skip_none=False),
            )
            # Before any data is read (its own setup check comes after the data's setup).
            export.check(self.trainer, self.model, self.datamodule)
            self.trainer.callbacks.append(export)
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is not None:
                check_output_location(callback.dirpath, f"{type(callback).__name__} dirpath")


class MergeCLI(ProjectCLI):
    """``merge.py``: the DataModule tells the model which tasks, in which order, with which labels."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``test`` (merge and evaluate) and ``fit`` (AdaMerging); no model here validates or predicts."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "test")}

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.task_names", "model.init_args.tasks", apply_on="instantiate")
        parser.link_arguments("data.classnames", "model.init_args.classnames", apply_on="instantiate")
        parser.link_arguments("data.splits", "model.init_args.splits", apply_on="instantiate")

    def check_before_launch(self) -> None:
        super().check_before_launch()
        if self.subcommand == "fit":  # test-time adaptation: each step one global batch of every task
            check_split_over_devices(self.datamodule.adaptation_batch_size, self.trainer, "data.adaptation_batch_size")

    def before_test(self) -> None:
        # Here and not only in the model's setup: before any checkpoint is read.
        if isinstance(self.model, MultiTaskEvaluation):
            self.model.check_test_does_something(self.trainer)
        super().before_test()
