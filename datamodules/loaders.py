"""DataLoaders shared by the single-task and the multi-task DataModules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.errors import DataError
from datamodules.images import UnreadableBatch
from datamodules.samplers import StepStreamSampler


def distributed_context(trainer: Any) -> tuple[int, int]:
    """``(rank, world_size)`` of the attached trainer, ``(0, 1)`` without one."""
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


#: With several processes, ``Trainer(use_distributed_sampler=True)`` (a plain Trainer's default) has
#: Lightning wrap the training loader's sampler in its own, which re-shards and reorders the seeded
#: stream. (Evaluation loaders already hold a DistributedSampler, which Lightning leaves alone.)
OWN_SAMPLING = (
    "set trainer.use_distributed_sampler=false: the training data is ordered and sharded by its "
    "DataModule (Lightning's sampler would replace the seeded order)"
)


def evaluates_nothing(trainer: Any) -> bool:
    """Whether ``trainer``'s test run evaluates nothing: ``merge.py test --trainer.limit_test_batches 0``
    (merge and write only) reads no batch. Decided here, once, for everyone who asks: the CLI before
    the run starts (a run that would do nothing is refused), the multi-task DataModule (which then
    reads no data) and the merge-side models (which then write right after merging). Asked before
    ``Trainer.test`` starts or during it; never while fitting (AdaMerging's ``merge.py fit``)."""
    return trainer is not None and trainer.state.fn in (None, TrainerFn.TESTING) and trainer.limit_test_batches == 0


def check_split_over_devices(batch_size: int, trainer: Any, option: str, accumulate: int = 1) -> None:
    """``batch_size`` (a global batch) splits evenly over the trainer's processes and ``accumulate``
    batches each. The CLI asks before the processes start, so the error is printed once."""
    _, world_size = distributed_context(trainer)
    if batch_size % (world_size * accumulate):
        over = f"{world_size} device(s)" + (f" x {accumulate} accumulated batches" if accumulate > 1 else "")
        raise DataError(f"{option} {batch_size} (a global batch) does not split over {over}")


def pin_memory(trainer: Any) -> bool:
    """Pinned host memory speeds up copies to a CUDA device and only then."""
    return trainer is not None and trainer.strategy.root_device.type == "cuda"


def step_stream_dataloader(
    dataset: Dataset,
    global_batch_size: int,
    micro_batch_size: int,
    steps_per_epoch: int,
    seed: int,
    num_workers: int,
    trainer: Any,
    fresh_draws: bool = False,
) -> StepStreamDataLoader:
    """A training loader over this rank's share of the seeded stream (``StepStreamSampler``,
    or its new shuffle per step with ``fresh_draws``); on resume it continues at the trainer's
    restored step."""
    rank, world_size = distributed_context(trainer)
    sampler = StepStreamSampler(
        len(dataset), global_batch_size, steps_per_epoch, seed=seed, rank=rank, world_size=world_size, fresh_draws=fresh_draws
    )
    sampler.resume_step = trainer.global_step if trainer is not None else 0
    return StepStreamDataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory(trainer),
    )


def evaluation_dataloader(dataset: Dataset, batch_size: int, num_workers: int, trainer: Any) -> DataLoader:
    """In order, and on several processes each sample exactly once over all of them."""
    rank, world_size = distributed_context(trainer)
    sampler = None
    if world_size > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return CheckedDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory(trainer),
    )


def collate(samples: list | UnreadableBatch) -> Any:
    """``default_collate``; a batch whose images could not be read stays the ``UnreadableBatch`` it is."""
    return samples if isinstance(samples, UnreadableBatch) else default_collate(samples)


class CheckedDataLoader(DataLoader):
    """A DataLoader (with ``collate``) that raises the ``DataError`` of a batch that could not be
    read (``UnreadableBatch``) in the main process, as one line, whether a worker process read it
    or not."""

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, UnreadableBatch):
                raise DataError(batch.message)
            yield batch


class StepStreamDataLoader(CheckedDataLoader):
    """The training loader. Its checkpointed state records the data order's settings, so a
    resumed run that would silently see other samples stops with an error instead.

    With ``use_distributed_sampler`` on (a plain ``Trainer``'s default) and several processes,
    Lightning rebuilds this loader around its own sampler; the loader then refuses to run."""

    def stream(self) -> StepStreamSampler:
        """The loader's seeded stream of indices."""
        if not isinstance(self.sampler, StepStreamSampler):
            raise DataError(OWN_SAMPLING)
        return self.sampler

    def __iter__(self) -> Any:
        self.stream()
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        stream = self.stream()
        return {
            "num_samples": stream.num_samples,
            "global_batch_size": stream.global_batch_size,
            "seed": stream.seed,
            "fresh_draws": int(stream.fresh_draws),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        current = self.state_dict()
        changed = {key: (state[key], current[key]) for key in current if key in state and state[key] != current[key]}
        if changed:
            detail = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            raise DataError(f"cannot resume: the checkpoint's training data order differs from this run ({detail})")
