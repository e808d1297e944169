"""The data pass of merges that need data (RegMean's Gram matrices, Fisher merging's Fishers, RegMean++'s
images), as Lightning runs it: every fine-tuned model of the pool over its own task's unlabelled train
images (the DataModule's ``gram`` loaders, first in ``Trainer.test``), with the statistics the methods
read summed as the images go by; for RegMean++, which runs the models block after block once merging
starts, the preprocessed images kept on the device (decoded once).

Two modules, two jobs: ``merging.grams`` and ``merging.fisher`` do the math (the hooks and
gradients, the sums, their reduction over processes, the means), with no Lightning; this one runs
it over the data inside a merge-side LightningModule, whose one entry is
``MultiTaskEvaluation.start_gram_pass``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from datamodules.multitask import GRAM_SPLIT
from lightning_modules.backbones import heads_from_state, load_backbone
from merging.errors import MergeError
from merging.fisher import FisherAccumulator, mean_fishers
from merging.grams import GramAccumulator, all_reduce_sum, mean_grams
from merging.methods import MergeMethod
from merging.pool import ModelPool
from merging.regmean_plusplus import ImageBatches


@dataclass
class DataStatistics:
    """What the pass gathered, over all processes: per Linear weight key each task's mean Gram
    (``grams``), per parameter key each task's diagonal Fisher (``fishers``), both in the pool's task
    order (None where no method reads them), this process's preprocessed images per task (``batches``,
    where a method runs the models on them itself), and the images read per task (all processes)."""

    grams: dict[str, list[Tensor]] | None = None
    fishers: dict[str, list[Tensor]] | None = None
    batches: ImageBatches | None = None
    images: dict[str, int] = field(default_factory=dict)

    def for_method(self, method: MergeMethod) -> dict[str, object]:
        """``merge_backbone``'s keyword arguments for ``method``: the statistics (or images) it reads."""
        return {
            "grams": self.grams if method.needs_grams else None,
            "fishers": self.fishers if method.needs_fisher else None,
            "images": self.batches if method.needs_images else None,
        }


class GramPass(nn.Module):
    """Per fine-tuned model of ``pool``, fed its own task's images: a ``GramAccumulator`` where a
    method reads Grams, a ``FisherAccumulator`` where one reads Fishers (one backbone per task for both);
    the images themselves where one runs the models on them (``MergeMethod.needs_images``).

    Args:
        pool: the model pool; each fine-tuned backbone is loaded, frozen, for the pass.
        tasks: the tasks whose ``gram`` images the DataModule reads: every task of the pool,
            since every fine-tuned model is merged.
        methods: the merges that wait for the pass (``MergeMethod.needs_data``).
    """

    def __init__(self, pool: ModelPool, tasks: list[str], methods: Sequence[MergeMethod]) -> None:
        super().__init__()
        missing = [task for task in pool.task_names if task not in tasks]
        if missing:
            what = "Gram" if all(method.needs_grams for method in methods) else "unlabelled train"
            raise MergeError(
                f"the merge needs {what} images of every task of the model pool; data.tasks lacks {', '.join(missing)}"
            )
        self.order = pool.task_names
        self.reads_grams = any(method.needs_grams for method in methods)
        self.reads_fishers = any(method.needs_fisher for method in methods)
        self.keeps_images = any(method.needs_images for method in methods)
        #: task -> this process's batches of preprocessed images (``keeps_images``).
        self.batches: dict[str, list[Tensor]] = {task: [] for task in self.order}
        self.counts = dict.fromkeys(self.order, 0)
        loaded = self.reads_grams or self.reads_fishers
        backbones = {task: load_backbone(pool, task) for task in self.order} if loaded else {}
        self.accumulators = nn.ModuleDict(
            {task: GramAccumulator(backbones[task]) for task in self.order} if self.reads_grams else {}
        )
        heads = heads_from_state({task: pool.head(task) for task in self.order}) if self.reads_fishers else None
        self.fisher_accumulators = nn.ModuleDict(
            {task: FisherAccumulator(backbones[task], heads.route(task)) for task in self.order} if self.reads_fishers else {}
        )

    def step(self, images: Tensor, task: str) -> None:
        self.counts[task] += images.shape[0]
        if self.keeps_images:
            with torch.inference_mode(False):  # an ordinary tensor, read later outside the test loop's inference mode
                self.batches[task].append(images.clone())
        if self.reads_grams:
            self.accumulators[task](images)
        if self.reads_fishers:
            self.fisher_accumulators[task](images)

    def statistics(self, device: torch.device, dtype: torch.dtype = torch.float32) -> DataStatistics:
        """The pass's ``DataStatistics``, summed over all processes first (the same order of
        reductions on every process: the image counts, then Grams and Fishers task by task); the kept
        images for forwards on ``device`` in ``dtype``."""
        gathered = DataStatistics(grams={} if self.reads_grams else None, fishers={} if self.reads_fishers else None)
        counts = torch.tensor([self.counts[task] for task in self.order], dtype=torch.int64, device=device)
        all_reduce_sum(counts)
        gathered.images = dict(zip(self.order, counts.tolist()))
        if self.keeps_images:
            empty = [task for task, count in gathered.images.items() if count == 0]
            if empty:
                raise MergeError(f"the data pass read no image of task '{empty[0]}' (trainer.limit_test_batches?)")
            gathered.batches = ImageBatches(self.batches, device, dtype)
        for task in self.order:
            if self.reads_grams:
                accumulator = self.accumulators[task]
                sums, rows, gathered.images[task] = accumulator.reduced_sums(device)
                if gathered.images[task] == 0:
                    raise MergeError(f"the Gram pass read no image of task '{task}' (trainer.limit_test_batches?)")
                for key, gram in zip(accumulator.keys, mean_grams(sums, rows, accumulator.keys, task)):
                    gathered.grams.setdefault(key, []).append(gram)
            if self.reads_fishers:
                fisher = self.fisher_accumulators[task]
                sums, gathered.images[task] = fisher.reduced_sums(device)
                for key, mean in zip(fisher.keys, mean_fishers(sums, gathered.images[task], task)):
                    gathered.fishers.setdefault(key, []).append(mean)
        return gathered


def data_purpose(methods: Sequence[MergeMethod]) -> str:
    """What the ``gram`` images are for, as the error for a missing ``data.gram_images`` says it."""
    needs = [
        what
        for what, needed in (
            ("its Gram matrices", any(method.needs_grams for method in methods)),
            ("the Fisher of each fine-tuned model", any(method.needs_fisher for method in methods)),
            ("the Gram matrices of the merged model's activations", any(method.needs_images for method in methods)),
        )
        if needed
    ]
    return f"for {' and '.join(needs) or 'its statistics'}"


def check_gram_split(needs_data: bool, splits: list[str], model: str, what: str = "for its Gram matrices") -> None:
    """The data read the ``gram`` split (``data.gram_images``) exactly when the merge needs data;
    ``what`` names what the images are for, in the message."""
    given = GRAM_SPLIT in splits
    if needs_data and not given:
        raise MergeError(f"this merge needs unlabelled train images {what}: set data.gram_images (e.g. 256)")
    if given and not needs_data:
        raise MergeError(f"data.gram_images is set, but {model} with these methods merges without data: drop it")
