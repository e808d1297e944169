"""Fine-tuning: a Hugging Face image classifier (ConvNeXt by default, or any family of
``common.architectures``) trained with plain SGD."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoConfig, PreTrainedModel

from common.checkpoints import check_checkpoint, check_head_labels, resolve_model_dir
from common.errors import CheckpointError
from datamodules.errors import check_setting
from lightning_modules.errors import TrainingError


def classification_metrics(num_classes: int) -> MetricCollection:
    """Top-1 accuracy, and top-5 where there are more than five classes."""
    metrics = {"accuracy": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["accuracy_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


def label_maps(classnames: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(classnames)), {name: i for i, name in enumerate(classnames)}


class ImageClassifier(LightningModule):
    """An image classifier of the checkpoint's family (``ConvNextForImageClassification`` for the
    default ``facebook/convnext-base-224``; ``ResNetForImageClassification`` for ``microsoft/resnet-50``,
    ...: ``common.architectures``) fine-tuned with SGD and cross-entropy.

    Args:
        num_classes: number of classes of the task (linked from the DataModule).
        classnames: class names in label order (linked from the DataModule); written into the
            model config as ``id2label`` / ``label2id``.
        model_name_or_path: hub id or local checkpoint directory to start from, of a supported
            family (ConvNeXt, ConvNeXt-V2, ResNet, ViT, DINOv2, Swin); give ``data.processor`` the
            same, so the images are preprocessed as that model's were.
        pretrained: load the checkpoint's weights; false builds the architecture from its
            config with random weights.
        new_head: replace the classifier by a freshly initialised head of the task's size, the
            family's layout (a ``Linear``; ResNet's ``Flatten`` and ``Linear``): fine-tuning. False keeps the checkpoint's own head, which must be for this
            task (evaluating an exported model).
        lr: SGD learning rate (the recipe's lives in ``configs/train/base.yaml``, as every
            tuned value: none is repeated here as a default).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (L2), on all parameters.
        scheduler: learning-rate scheduler, stepped every optimizer step; default none (constant).
        label_smoothing: cross-entropy label smoothing.
        channels_last: keep activations in channels-last memory format (faster convolutions on GPUs).
        compile: compile the model with ``torch.compile`` (in place: the same parameters and
            state-dict keys, so checkpoints and exports are unchanged); the first steps pay the
            compilation. ``benchmarks/compile_check.py`` measures speed and numerics against eager.
    """

    def __init__(
        self,
        num_classes: int,
        classnames: list[str] | None = None,
        model_name_or_path: str = "facebook/convnext-base-224",
        pretrained: bool = True,
        new_head: bool = True,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_setting(0 < lr < math.inf, "model.lr", "a positive number", lr, TrainingError)
        check_setting(0 <= momentum < math.inf, "model.momentum", "0 or more", momentum, TrainingError)
        check_setting(0 <= weight_decay < math.inf, "model.weight_decay", "0 or more", weight_decay, TrainingError)
        check_setting(0 <= label_smoothing < 1, "model.label_smoothing", "in [0, 1)", label_smoothing, TrainingError)
        self.save_hyperparameters(ignore=["scheduler"])
        classnames = list(classnames) if classnames is not None else [str(i) for i in range(num_classes)]
        if len(classnames) != num_classes:
            raise CheckpointError(f"{len(classnames)} class names given for {num_classes} classes")
        self.classnames = classnames
        self.model = self._build(model_name_or_path, pretrained, new_head, classnames)
        # from_pretrained hands the model back in eval mode; training needs train mode (stochastic
        # depth, dropout), and Lightning's loops switch to eval for validation and test themselves.
        self.model.train()
        self.scheduler = scheduler
        self.channels_last = channels_last
        self.compile_model = compile
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = classification_metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    @staticmethod
    def _build(source: str, pretrained: bool, new_head: bool, classnames: list[str]) -> PreTrainedModel:
        directory = resolve_model_dir(source)
        family = check_checkpoint(directory, source, weights=pretrained)
        if pretrained:
            model = family.classifier_class.from_pretrained(directory, dtype=torch.float32)
        else:
            model = family.classifier_class(AutoConfig.from_pretrained(directory))
        if new_head:
            family.replace_head(model, len(classnames))
        else:
            check_head_labels(model.config, classnames, source)
        model.config.num_labels = len(classnames)
        model.config.id2label, model.config.label2id = label_maps(classnames)
        return model

    def configure_model(self) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile_model and not getattr(self, "_compiled", False):  # the hook runs once per stage
            self.model.compile()
            self._compiled = True

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.model(pixel_values=pixel_values).logits

    def on_fit_start(self) -> None:
        # ``seed_everything``'s seed (the same in a resumed run): the root of every step's randomness.
        self._base_seed = torch.initial_seed()

    def _step_seed(self, batch_idx: int) -> int:
        """The seed of this forward pass's randomness (dropout, stochastic depth): the run's seed,
        the optimizer step and the micro-batch within it, so a resumed run draws what the
        uninterrupted one drew. The global generator's own state would not do: every DataLoader
        iterator (a validation's, the sanity check's) draws from it, and a resumed run makes
        other iterators than the run it continues."""
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        return int(np.random.SeedSequence([self._base_seed, self.global_step, micro_batch]).generate_state(1, np.uint64)[0] >> 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        accelerator = self.device.type != "cpu"
        # Forked: the global generators go on as they would have for everything else.
        with torch.random.fork_rng(
            devices=[self.device] if accelerator else [], device_type=self.device.type if accelerator else None
        ):
            torch.manual_seed(self._step_seed(batch_idx))
            logits = self(images)
        loss = self.loss(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(self.train_metrics(logits, labels))
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, loss: MeanMetric) -> None:
        images, labels = batch
        logits = self(images)
        loss.update(self.loss(logits, labels), weight=labels.numel())
        metrics.update(logits, labels)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        # compute() syncs over processes: every sample counted once, whatever the batch split.
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_loss.reset()
        self.val_metrics.reset()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss.compute())
        self.log_dict(self.test_metrics.compute())
        self.test_loss.reset()
        self.test_metrics.reset()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}
