"""A seeded training order that any number of devices share and that resumes exactly.

The order is one stream over the training set: pass ``p`` is a permutation seeded by
``(seed, p)``, and the passes follow each other. Optimizer step ``s`` takes stream
positions ``[s * G, (s + 1) * G)`` for the global batch ``G``; rank ``r`` of ``R`` takes
its contiguous ``G / R`` of them. So the samples of every step are the same whatever
the device count, and a run resumed at step ``s`` continues at exactly that position.

With ``fresh_draws``, step ``s`` instead takes the first ``G`` of its own permutation, seeded
by ``(seed, s)``: a new shuffle every step (the AdaMerging authors' code builds a shuffled
DataLoader per step), split over ranks and resumed the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class StepStreamSampler(Sampler[int]):
    """Indices for optimizer steps ``[first_step, last_step)`` of one rank.

    Args:
        num_samples: size of the training set.
        global_batch_size: samples per optimizer step, over all ranks and accumulated batches.
        steps_per_epoch: optimizer steps that one Lightning epoch spans.
        seed: seed of the order.
        rank: this process's rank.
        world_size: number of processes.
        fresh_draws: every step draws its samples from a new shuffle instead of continuing
            the stream.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        steps_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fresh_draws: bool = False,
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} does not split over {world_size} processes")
        if fresh_draws and global_batch_size > num_samples:
            raise ValueError(f"a fresh draw takes {global_batch_size} distinct samples of {num_samples}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.fresh_draws = fresh_draws
        self.epoch = 0
        self.resume_step = 0
        #: steps between the run's epoch starts and ``epoch * steps_per_epoch`` (``_epoch_start``),
        #: fixed at the first pass after ``resume_step`` is set
        self._shift: int | None = None

    @property
    def rank_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _permutation(self, stream_pass: int) -> np.ndarray:
        return np.random.default_rng([self.seed, stream_pass]).permutation(self.num_samples)

    def __len__(self) -> int:
        # The whole epoch, also when resumed part-way: Lightning counts the batches it already saw.
        return self.steps_per_epoch * self.rank_batch_size

    def _epoch_start(self) -> int:
        """The optimizer step this epoch starts at: ``epoch * steps_per_epoch``, unless the run was
        resumed from one whose epochs were shorter. A step-based run's one epoch spans its
        ``max_steps``, so a finished run resumed with more steps starts its next epoch at the step
        it stopped, before ``epoch * steps_per_epoch``: the stream goes on from there (not from
        that later step, skipping samples), and the epochs after it follow on."""
        start = self.epoch * self.steps_per_epoch
        if self._shift is None:
            self._shift = min(0, self.resume_step - start) if self.resume_step > 0 else 0
        return start + self._shift

    def __iter__(self) -> Iterator[int]:
        first_epoch_step = self._epoch_start()
        first = max(first_epoch_step, self.resume_step)
        last = first_epoch_step + self.steps_per_epoch
        if self.fresh_draws:
            yield from self._fresh(first, last)
            return
        cached_pass, permutation = -1, None
        for step in range(first, last):
            start = step * self.global_batch_size + self.rank * self.rank_batch_size
            for position in range(start, start + self.rank_batch_size):
                stream_pass, offset = divmod(position, self.num_samples)
                if stream_pass != cached_pass:
                    cached_pass, permutation = stream_pass, self._permutation(stream_pass)
                yield int(permutation[offset])

    def _fresh(self, first: int, last: int) -> Iterator[int]:
        start = self.rank * self.rank_batch_size
        for step in range(first, last):
            drawn = np.random.default_rng([self.seed, step]).permutation(self.num_samples)
            yield from map(int, drawn[start : start + self.rank_batch_size])
