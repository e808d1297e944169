"""The fine-tuned classifier as a self-describing Hugging Face checkpoint, written at the end of
``fit`` by a Lightning callback, so a plain ``Trainer.fit`` exports as ``train.py`` does."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from common.files import check_export_target, check_output_location, write_atomically
from datamodules.tasks import get_task
from lightning_modules.errors import TrainingError


def export_name(model_name_or_path: str, task_hub_name: str, batch_size: int, lr: float, steps: int) -> str:
    """The public checkpoints' naming: ``convnext-base-224_dtd_sgd_batch-size-64_lr-0.01_steps-4000``."""
    base = Path(model_name_or_path.rstrip("/")).name
    return f"{base}_{task_hub_name}_sgd_batch-size-{batch_size}_lr-{lr:g}_steps-{steps}"


def export_path(config: Mapping[str, Any], steps: int) -> Path | None:
    """Where ``train.py fit`` with the resolved ``config`` (``fit``'s section, as a plain dict)
    exports after ``steps`` optimizer steps; None with ``export_dir: null``."""
    if config.get("export_dir") is None:
        return None
    model, data = config["model"], config["data"]
    name = config.get("export_name") or export_name(
        model["model_name_or_path"], get_task(data["task"]).hub_name, data["batch_size"], model["lr"], steps
    )
    return Path(config["export_dir"]) / name


def check_export_steps(max_steps: int | None) -> None:
    """The recipe counts optimizer steps and the export is named after them: ``max_steps`` must
    say how many, before training (0 would export the model as it started; -1 leaves the count to
    ``max_epochs``, known only once the data is read, and the name unchecked until the end)."""
    if max_steps == 0:
        raise TrainingError("trainer.max_steps 0 trains nothing, and the export would be the untrained model: give 1 or more")
    if max_steps is None or max_steps < 0:
        raise TrainingError(
            f"trainer.max_steps must be 1 or more to export, got {max_steps}: the export is named after its optimizer "
            "steps, which trainer.max_epochs leaves open until the data is read (set trainer.max_steps, or --export_dir null)"
        )


def schedule(trainer: Trainer) -> str:
    """The learning-rate schedule the run stepped, as the model card states it: each scheduler's
    class and settings."""
    described = []
    for config in trainer.lr_scheduler_configs:
        settings = []
        for key, value in config.scheduler.state_dict().items():
            # What the scheduler was given, not how far it got (last_epoch, base_lrs, _step_count, ...).
            if key.startswith("_") or key in ("base_lrs", "last_epoch") or not isinstance(value, (int, float, str)):
                continue
            settings.append(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}")
        every = "optimizer step" if config.interval == "step" else config.interval
        described.append(f"{type(config.scheduler).__name__} ({', '.join(settings)}), stepped every {every}")
    return "; ".join(described) or "constant"


def model_card(
    name: str, base_model: str, task: str, hub_dataset: str | None, recipe: Mapping[str, object], metrics: Mapping[str, float]
) -> str:
    """README.md of an exported checkpoint: what it is, how it was trained, how it scored."""
    front = ["---", "library_name: transformers", "pipeline_tag: image-classification", f"base_model: {base_model}"]
    if hub_dataset:
        front += ["datasets:", f"- {hub_dataset}"]
    front += ["tags:", "- convnext-fusion", f"- {task}", "---", ""]
    lines = [
        f"# {name}",
        "",
        f"`{base_model}` fine-tuned on **{task}** with convnext-fusion (`train.py fit`).",
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in recipe.items()),
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {key} | {value:.4f} |" for key, value in sorted(metrics.items())),
        "",
        "The resolved training configuration, where `train.py` ran it, is in `train_config.yaml`.",
        "",
    ]
    return "\n".join(front + lines)


class HuggingFaceExport(Callback):
    """At the end of a ``fit`` that finished, rank 0 writes the fine-tuned classifier to
    ``<export_dir>/<export_name>``, whole or not at all (the other ranks wait):
    ``config.json`` with the task's ``id2label``, ``model.safetensors``,
    ``preprocessor_config.json``, a model card ``README.md`` (base model, task, recipe, final
    validation metrics) and, where given, the resolved configuration ``train_config.yaml``.
    An export that exists, an ``export_dir`` that cannot be written, or a ``max_steps`` that is
    not 1 or more (the name counts the steps), is refused when fit starts, before any training.
    For ``ImageClassifier`` with ``ImageClassificationDataModule``:
    ``Trainer(max_steps=4000, callbacks=[HuggingFaceExport("exports")]).fit(model, datamodule=data)``.

    Args:
        export_dir: root of the export.
        export_name: the export's directory name (default: the public checkpoints' naming,
            ``<model>_<task>_sgd_batch-size-<B>_lr-<lr>_steps-<N>``).
        overwrite: replace an existing export.
        config_yaml: the run's resolved configuration, kept beside the weights as
            ``train_config.yaml`` (``train.py`` passes it).
    """

    def __init__(
        self, export_dir: str = "exports", export_name: str | None = None, overwrite: bool = False, config_yaml: str | None = None
    ) -> None:
        self.export_dir = export_dir
        self.export_name = export_name
        self.overwrite = overwrite
        self.config_yaml = config_yaml

    def target(self, pl_module: LightningModule, datamodule: Any, steps: int) -> Path:
        hparams = pl_module.hparams
        name = self.export_name or export_name(
            hparams.model_name_or_path, datamodule.task.hub_name, datamodule.batch_size, hparams.lr, steps
        )
        return Path(self.export_dir) / name

    def check(self, trainer: Trainer, pl_module: LightningModule, datamodule: Any) -> None:
        """Refuse an export that would be refused or fail at the end of training, or that would be
        the untrained model."""
        check_export_steps(trainer.max_steps)
        check_output_location(self.export_dir, "export_dir")
        if trainer.is_global_zero:
            check_export_target(self.target(pl_module, datamodule, trainer.max_steps), self.overwrite)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check(trainer, pl_module, trainer.datamodule)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not called for a fit that ended in an exception or an interrupt: nothing half-trained is exported.
        target = self.target(pl_module, trainer.datamodule, trainer.global_step)
        if trainer.is_global_zero:
            write = partial(self._write, trainer=trainer, pl_module=pl_module, name=target.name)
            write_atomically(target, write, self.overwrite)
            print(f"exported {target}")
        trainer.strategy.barrier("export")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.training:
            target = self.target(pl_module, trainer.datamodule, trainer.global_step)
            print(f"fit did not finish: nothing exported to {target}", file=sys.stderr)

    def _write(self, directory: Path, trainer: Trainer, pl_module: LightningModule, name: str) -> None:
        data, hparams = trainer.datamodule, pl_module.hparams
        pl_module.model.config.finetuning_task = data.task.name
        pl_module.model.save_pretrained(directory)
        data.image_processor.save_pretrained(directory)
        recipe = {
            "base model": hparams.model_name_or_path,
            "task": data.task.name,
            "optimizer": f"SGD (lr {hparams.lr:g}, momentum {hparams.momentum:g}, weight decay {hparams.weight_decay:g})",
            "learning-rate schedule": schedule(trainer),
            "global batch size": data.batch_size,
            "steps": trainer.global_step,
            "precision": trainer.precision,
            "label smoothing": hparams.label_smoothing,
            **data.recipe,
            "seed": os.environ.get("PL_GLOBAL_SEED"),  # what seed_everything set, where it ran
        }
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        card = model_card(name, hparams.model_name_or_path, data.task.name, data.task.hub_dataset, recipe, metrics)
        (directory / "README.md").write_text(card)
        if self.config_yaml is not None:
            (directory / "train_config.yaml").write_text(self.config_yaml)
