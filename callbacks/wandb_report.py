"""The evaluation report in Weights & Biases: its table and figures, logged by a callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from callbacks.report import table_rows


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (ours or Lightning's), for tables and images."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class WandbReport(Callback):
    """At the end of a test run, rank 0 logs the module's ``report`` to every W&B logger: the
    Markdown table's columns (tasks abbreviated) as the table ``test/report`` and, where the report
    files were written, both figures (``test/accuracy_chart``, ``test/accuracy_heatmap``).

    Args:
        figures_dir: where ``accuracy.png`` and ``accuracy_heatmap.png`` were written (by
            ``ReportFiles``, listed before this callback); None logs the table only.
    """

    def __init__(self, figures_dir: str | None) -> None:
        self.figures_dir = figures_dir

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report: Any = getattr(pl_module, "report", None)
        if not trainer.is_global_zero or report is None:
            return
        for logger in wandb_loggers(trainer):
            header, lines = table_rows(report)
            logger.log_table(key="test/report", columns=header, data=lines)
            if self.figures_dir is not None:
                logger.log_image(key="test/accuracy_chart", images=[str(Path(self.figures_dir, "accuracy.png"))])
                logger.log_image(key="test/accuracy_heatmap", images=[str(Path(self.figures_dir, "accuracy_heatmap.png"))])
