"""The Gram pass of merges that need data (RegMean), as Lightning runs it: every fine-tuned backbone
of the pool over its own task's unlabelled train images (the DataModule's ``gram`` loaders, first
in ``Trainer.test``), with the inputs of its Linear layers summed into Gram matrices.

Two modules, two jobs: ``merging.grams`` does the math (the hooks, the sums, their reduction over
processes, the means), with no Lightning; this one runs it over the data inside a merge-side
LightningModule, whose one entry is ``MultiTaskEvaluation.start_gram_pass``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from datamodules.multitask import GRAM_SPLIT
from lightning_modules.backbones import load_backbone
from merging.errors import MergeError
from merging.grams import GramAccumulator, mean_grams
from merging.pool import ModelPool


class GramPass(nn.Module):
    """One ``GramAccumulator`` per fine-tuned model of ``pool``, each fed its own task's images.

    Args:
        pool: the model pool; each fine-tuned backbone is loaded, frozen, for the pass.
        tasks: the tasks whose ``gram`` images the DataModule reads: every task of the pool,
            since every fine-tuned model is merged.
    """

    def __init__(self, pool: ModelPool, tasks: list[str]) -> None:
        super().__init__()
        missing = [task for task in pool.task_names if task not in tasks]
        if missing:
            raise MergeError(
                f"the merge needs Gram images of every task of the model pool; data.tasks lacks {', '.join(missing)}"
            )
        self.order = pool.task_names
        self.accumulators = nn.ModuleDict({task: GramAccumulator(load_backbone(pool, task)) for task in self.order})

    def step(self, images: Tensor, task: str) -> None:
        self.accumulators[task](images)

    def grams(self, device: torch.device) -> tuple[dict[str, list[Tensor]], dict[str, int]]:
        """Per Linear weight key, each task's mean Gram ``X^T X / N`` (pool order), summed over
        all processes first; and the number of images read per task."""
        per_key: dict[str, list[Tensor]] = {}
        images = {}
        for task in self.order:
            accumulator = self.accumulators[task]
            sums, rows, images[task] = accumulator.reduced_sums(device)
            if images[task] == 0:
                raise MergeError(f"the Gram pass read no image of task '{task}' (trainer.limit_test_batches?)")
            for key, gram in zip(accumulator.keys, mean_grams(sums, rows, accumulator.keys, task)):
                per_key.setdefault(key, []).append(gram)
        return per_key, images


def check_gram_split(needs_grams: bool, splits: list[str], model: str) -> None:
    """The data read the ``gram`` split (``data.gram_images``) exactly when the merge needs Grams."""
    given = GRAM_SPLIT in splits
    if needs_grams and not given:
        raise MergeError("this merge needs unlabelled train images for its Gram matrices: set data.gram_images (e.g. 256)")
    if given and not needs_grams:
        raise MergeError(f"data.gram_images is set, but {model} with these methods merges without data: drop it")
