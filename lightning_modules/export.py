"""Export a fine-tuned classifier as a self-describing Hugging Face checkpoint, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from merging.errors import CheckpointError


def export_name(model_name_or_path: str, task_hub_name: str, batch_size: int, lr: float, steps: int) -> str:
    """The public checkpoints' naming: ``convnext-base-224_dtd_sgd_batch-size-64_lr-0.01_steps-4000``."""
    base = Path(model_name_or_path.rstrip("/")).name
    return f"{base}_{task_hub_name}_sgd_batch-size-{batch_size}_lr-{lr:g}_steps-{steps}"


def check_export_target(target: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing export unless asked to."""
    if target.exists() and not overwrite:
        raise CheckpointError(f"export directory '{target}' already exists; pass --overwrite to replace it")


def write_atomically(target: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Run ``write(tmp_dir)`` and move the result to ``target``: it appears whole or not at all."""
    check_export_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        _make_readable(staging)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 and some writers 0600; an export is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


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
