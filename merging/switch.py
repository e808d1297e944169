"""Route each task to its own classifier head."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import torch
from torch import nn

from merging.errors import MergeError


class SwitchModule(nn.Module):
    """Holds one module per task and runs the one for the task asked.

    Args:
        routes: task name -> module (a classifier head).
    """

    def __init__(self, routes: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.routes = nn.ModuleDict(dict(routes))

    @property
    def tasks(self) -> list[str]:
        return list(self.routes)

    def route(self, task: str) -> nn.Module:
        if task not in self.routes:
            close = difflib.get_close_matches(task, self.routes, n=3)
            hint = f"; did you mean {', '.join(repr(name) for name in close)}?" if close else ""
            raise MergeError(f"no head for task '{task}'{hint} (heads: {', '.join(self.routes)})")
        return self.routes[task]

    def forward(self, features: torch.Tensor, task: str) -> torch.Tensor:
        return self.route(task)(features)
