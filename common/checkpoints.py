"""Where a checkpoint lives (a Hugging Face hub id or a local directory) and whether it is an
image classifier of a supported family (``common.architectures``) with the backbone and the head
a run needs, checked up front; both the fine-tuning and the merging side use these."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from common.architectures import ARCHITECTURES, Architecture, architecture, supported_families
from common.errors import CheckpointError
from common.names import plain_label
from common.reader import CheckpointReader

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


def _read_config(directory: Path, source: str) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint '{source}': unreadable config.json ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint '{source}': config.json holds a JSON {type(config).__name__}, not an object")
    return config


def check_checkpoint(directory: Path, source: str, weights: bool = True) -> Architecture:
    """The checkpoint in ``directory`` (named ``source``) must be an image classifier (or bare
    backbone) of a supported family whose backbone loads whole; returns its architecture record.

    transformers loads any checkpoint into a ``*ForImageClassification`` with only a warning
    about missing and unexpected keys, leaving those weights random: another architecture would
    be fine-tuned or merged from noise. Checked: the config's ``model_type`` (a family of
    ``common.architectures``) and ``architectures`` (that family's classifier or backbone), then
    (``weights``) every backbone tensor's key and shape against the ones the config asks for, and
    the head's class count (``check_head_config``).
    """
    config = _read_config(directory, source)
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    kind = ", ".join(map(str, architectures)) or "no architectures named"
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"checkpoint '{source}' is a '{model_type}' model ({kind}), not one of the supported families: {supported_families()}"
        )
    record = ARCHITECTURES[model_type]
    if any(name not in record.class_names for name in architectures):
        raise CheckpointError(
            f"checkpoint '{source}' is a '{model_type}' model ({kind}), not a {record.name} image classifier "
            f"({' or '.join(record.class_names)})"
        )
    if weights:
        _check_backbone_weights(directory, source, record)
        check_head_config(directory, source)
    return record


def _config_backbone(directory: Path, record: Architecture) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the backbone the checkpoint's config describes, in the network's order."""
    return record.checkpoint_shapes(AutoConfig.from_pretrained(directory))


def network_order(directory: Path) -> list[str]:
    """The backbone keys of the checkpoint's config in the order the network defines them (its
    ``state_dict``: embeddings, stage by stage and block by block, final norm), unlike a
    safetensors file's alphabetical order, where ``layers.10`` comes before ``layers.2``."""
    return list(_config_backbone(directory, architecture(_read_config(directory, str(directory)).get("model_type"))))


def _check_backbone_weights(directory: Path, source: str, record: Architecture) -> None:
    expected = _config_backbone(directory, record)
    prefix = record.prefix
    with CheckpointReader(directory) as reader:
        # transformers also loads a bare backbone checkpoint (facebook/dinov2-base), whose keys have no prefix.
        stored = {prefix + key.removeprefix(prefix): key for key in reader.keys()}
        stored = {key: name for key, name in stored.items() if not record.is_head_key(name)}
        missing = sorted(expected.keys() - stored.keys())
        unexpected = sorted(stored[key] for key in stored.keys() - expected.keys())
        problems = [f"{len(keys)} {kind} weight(s) ({', '.join(keys[:3])})"
                    for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
        if problems:
            raise CheckpointError(
                f"checkpoint '{source}' does not hold the backbone its {record.name} config describes: {'; '.join(problems)}"
            )
        for key, shape in expected.items():
            if reader.shape(stored[key]) != shape:
                raise CheckpointError(
                    f"shape mismatch for '{stored[key]}': {list(reader.shape(stored[key]))} in "
                    f"'{reader.path_of(stored[key])}' vs {list(shape)} in its config ({source})"
                )


def check_head_labels(config: Any, classnames: list[str], source: str) -> None:
    """A checkpoint's head must be for this task: same class count and, where named, same labels."""
    if config.num_labels != len(classnames):
        raise CheckpointError(
            f"checkpoint '{source}' has a {config.num_labels}-class head, but the task has {len(classnames)} classes"
        )
    names = [config.id2label[i] for i in range(config.num_labels)]
    generic = names == [f"LABEL_{i}" for i in range(config.num_labels)]
    if not generic and [plain_label(name) for name in names] != [plain_label(name) for name in classnames]:
        raise CheckpointError(
            f"checkpoint '{source}' was trained for other labels ({', '.join(names[:3])}, ...) "
            f"than the task's ({', '.join(classnames[:3])}, ...)"
        )


def check_head_config(directory: Path, source: str) -> None:
    """The class count ``config.json`` gives (``num_labels``, ``id2label``) must be the head's
    number of rows, where the checkpoint has a head: transformers otherwise stops loading it with
    a size-mismatch ``RuntimeError``, and every check of the head against a task would name the
    config's count for weights of another size. Reads the config and the weights' header only."""
    config = _read_config(directory, source)
    head_weight = architecture(config.get("model_type")).head_keys[0]
    with CheckpointReader(directory) as reader:
        if head_weight not in reader:
            return
        rows, file = reader.shape(head_weight)[0], reader.path_of(head_weight)
    counts = {}
    if isinstance(config.get("num_labels"), int):
        counts["num_labels"] = config["num_labels"]
    if isinstance(config.get("id2label"), dict):
        counts["id2label"] = len(config["id2label"])
    if not counts:  # transformers' default
        counts["no num_labels or id2label: the default"] = 2
    wrong = [f"{count} classes ({name})" for name, count in counts.items() if count != rows]
    if wrong:
        raise CheckpointError(
            f"checkpoint '{source}': its config.json ('{directory / 'config.json'}') gives {' and '.join(wrong)}, "
            f"but its head '{head_weight}' in '{file}' has {rows} rows"
        )
