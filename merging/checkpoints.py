"""Where a checkpoint lives: a Hugging Face hub id or a local directory, checked up front."""

from __future__ import annotations

import re
from pathlib import Path

from merging.errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
#: What a checkpoint needs to be merged or fine-tuned; model cards and the rest are skipped.
_CHECKPOINT_FILES = ["*.json", "*.safetensors"]


def is_hub_id(name: str) -> bool:
    """``owner/name`` or ``name`` (not a path)."""
    return bool(_HUB_ID.match(name)) and not name.startswith(".")


def check_model_source(name_or_path: str) -> None:
    """Fail early, with the reason, on a source that cannot be a checkpoint."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"'{name_or_path}' is a file; expected a checkpoint directory or a hub id")
        if not (local / "config.json").is_file():
            raise CheckpointError(f"checkpoint directory '{name_or_path}' has no config.json")
        return
    if not is_hub_id(name_or_path):
        raise CheckpointError(
            f"'{name_or_path}' is neither an existing checkpoint directory nor a Hugging Face hub id (owner/name)"
        )


def resolve_model_dir(name_or_path: str) -> Path:
    """A local directory holding the checkpoint: the path itself, or the hub snapshot in the cache."""
    check_model_source(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=_CHECKPOINT_FILES))
    except Exception as error:  # offline, unknown repo, network: one line naming the id
        raise CheckpointError(f"cannot fetch checkpoint '{name_or_path}' from the hub: {type(error).__name__}") from error
