"""A merge method written as one function (CONTRIBUTING.md's example). Imported only by the
process ``tests/test_merge_cli.py`` starts for it: once registered, a method stays among the
classes the CLI offers."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from merging import merge_function


@merge_function(elementwise=True)
def task_median(pretrained: torch.Tensor, task_vectors: Iterable[torch.Tensor], *, scaling_factor: float = 1.0) -> torch.Tensor:
    """``theta_0 + lambda * median_t tau_t`` (a method of the tests).

    Args:
        scaling_factor: lambda, applied to the entrywise median of the task vectors.
    """
    return pretrained + scaling_factor * torch.stack(list(task_vectors)).median(0).values
