"""Export a fine-tuned classifier as a self-describing Hugging Face checkpoint, atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datamodules.tasks import get_task
from merging.checkpoints import check_export_target, write_atomically

__all__ = ["check_export_target", "export_name", "export_path", "model_card", "write_atomically"]


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
        "The resolved training configuration is in `train_config.yaml`.",
        "",
    ]
    return "\n".join(front + lines)
