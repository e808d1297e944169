"""A row of one backbone per task (``PerTaskBackbones``), as a mask-based method's model is:
each task scored with its own backbone, by the same test step as every row."""

from __future__ import annotations

import torch
from torch import nn
from transformers import ConvNextModel

from conftest import tiny_config
from lightning_modules.backbones import heads_from_state
from lightning_modules.evaluation import MultiTaskEvaluation, PerTaskBackbones, row_backbone

TASKS = ["digits", "mnist5k"]
CLASSNAMES = {task: [str(label) for label in range(10)] for task in TASKS}


class TwoRows(MultiTaskEvaluation):
    """A shared backbone, another one, and a per-task row: the shared one on the first task, the other on the second."""

    def __init__(self, shared: nn.Module, other: nn.Module, heads: nn.Module) -> None:
        super().__init__(TASKS, CLASSNAMES, report_dir=None)
        self._given = (shared, other, heads)

    def build(self) -> None:
        shared, other, heads = self._given
        self.rows["shared"] = shared
        self.rows["other"] = other
        self.rows["per_task"] = PerTaskBackbones({TASKS[0]: shared, TASKS[1]: other})
        self.heads = heads


def backbone(seed: int) -> ConvNextModel:
    torch.manual_seed(seed)
    return ConvNextModel(tiny_config(image_size=32)).eval()


def test_a_per_task_row_scores_each_task_with_its_own_backbone():
    shared, other = backbone(0), backbone(1)
    heads = heads_from_state({task: {"weight": torch.randn(10, 64), "bias": torch.randn(10)} for task in TASKS})
    module = TwoRows(shared, other, heads)
    module.build()
    module._make_metrics()
    assert module._all_rows() == ["shared", "other", "per_task"]
    assert row_backbone(module.rows["per_task"], TASKS[1]) is other
    assert row_backbone(module.rows["shared"], TASKS[1]) is shared

    torch.manual_seed(2)
    batches = {task: (torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))) for task in TASKS}
    with torch.inference_mode():
        for index, task in enumerate(TASKS):
            module.test_step(batches[task], 0, dataloader_idx=index)
        losses = {(row, task): float(module.mean_loss[row][f"test/{task}"].compute()) for row in range(3) for task in TASKS}
        correct = {(row, task): float(module.accuracy[row][f"test/{task}"].compute()) for row in range(3) for task in TASKS}
    # Rows scored by the same computation on the same machine: bit for bit. On each task the
    # per-task row is the row of that task's own backbone, and on the second not the shared one.
    for numbers in (losses, correct):
        assert numbers[(2, TASKS[0])] == numbers[(0, TASKS[0])]
        assert numbers[(2, TASKS[1])] == numbers[(1, TASKS[1])]
    assert losses[(2, TASKS[1])] != losses[(0, TASKS[1])]
    assert int(module.samples[2][f"test/{TASKS[1]}"].compute()) == 6
