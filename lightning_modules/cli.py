"""The LightningCLI subclasses behind ``train.py`` and ``merge.py``."""

from __future__ import annotations

import contextvars
import gc
import sys
from typing import Any

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from common.errors import CheckpointError
from common.files import check_output_location
from datamodules.errors import DataError
from datamodules.loaders import OWN_SAMPLING, check_split_over_devices
from lightning_modules.errors import TrainingError
from lightning_modules.evaluation import MultiTaskEvaluation
from lightning_modules.export import HuggingFaceExport
from lightning_modules.noise import silence_known_noise
from lightning_modules.parser_errors import ProjectArgumentParser
from lightning_modules.resume import check_given_checkpoint
from lightning_modules.run_files import SaveConfigOfCompletedRuns, check_resume_checkpoint, default_checkpoint_dir
from lightning_modules.trainer_options import add_trainer_arguments
from lightning_modules.versions import UnverifiedVersionError, check_verified_versions
from merging.errors import MergeError

#: Errors that mean bad input (or an installation outside the verified versions): reported as
#: one line, without a traceback.
INPUT_ERRORS = (DataError, CheckpointError, MergeError, TrainingError, UnverifiedVersionError)


def _input_error(error: BaseException | None) -> BaseException | None:
    """The input error behind ``error``: jsonargparse wraps one raised while instantiating a
    subclass (``--model MergedClassifier``) in a ValueError of its own, ``from`` the original."""
    while error is not None:
        if isinstance(error, INPUT_ERRORS):
            return error
        error = error.__cause__
    return None


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
        check_resume_checkpoint(self.trainer, self.subcommand_config().get("ckpt_path"), self.model)
        self.freeze_startup_objects()

    def before_validate(self) -> None:
        self.check_before_launch()
        self.freeze_startup_objects()

    def before_test(self) -> None:
        self.check_before_launch()
        self.freeze_startup_objects()


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
            self.model.check_precision(self.trainer)
        super().before_test()
