"""Where a checkpoint lives: a Hugging Face hub id or a local directory, checked up front."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import ConvNextConfig, ConvNextModel

from merging.errors import CheckpointError
from merging.reader import CheckpointReader

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
#: What a checkpoint needs to be merged or fine-tuned; model cards and the rest are skipped.
_CHECKPOINT_FILES = ["*.json", "*.safetensors"]
#: Key prefix of the backbone in a ``ConvNextForImageClassification`` checkpoint.
BACKBONE_PREFIX = "convnext."
#: The ConvNeXt classes whose checkpoints hold a ``ConvNextModel`` backbone.
_CONVNEXT_ARCHITECTURES = ("ConvNextForImageClassification", "ConvNextModel")


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


def check_convnext_checkpoint(directory: Path, source: str, weights: bool = True) -> None:
    """The checkpoint in ``directory`` (named ``source``) must be a ConvNeXt whose backbone loads whole.

    transformers loads any checkpoint into ``ConvNextForImageClassification`` with only a
    warning about missing and unexpected keys, leaving those weights random: another
    architecture would be fine-tuned or merged from noise. Checked: the config's
    ``model_type`` and ``architectures``, then (``weights``) every backbone tensor's key and
    shape against the ones the config asks for.
    """
    config = _read_config(directory, source)
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type != "convnext" or any(name not in _CONVNEXT_ARCHITECTURES for name in architectures):
        kind = ", ".join(map(str, architectures)) or "no architectures named"
        raise CheckpointError(
            f"checkpoint '{source}' is a '{model_type}' model ({kind}), not a ConvNeXt "
            f"({' or '.join(_CONVNEXT_ARCHITECTURES)})"
        )
    if weights:
        _check_backbone_weights(directory, source)


def _config_backbone(directory: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the backbone the checkpoint's config describes."""
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        model = ConvNextModel(ConvNextConfig.from_pretrained(directory))
    return {BACKBONE_PREFIX + key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def network_order(directory: Path) -> list[str]:
    """The backbone keys of the checkpoint's config in the order the network defines them (its
    ``state_dict``: embeddings, stage by stage and block by block, final norm), unlike a
    safetensors file's alphabetical order, where ``layers.10`` comes before ``layers.2``."""
    return list(_config_backbone(directory))


def _check_backbone_weights(directory: Path, source: str) -> None:
    expected = _config_backbone(directory)
    with CheckpointReader(directory) as reader:
        # transformers also loads a bare ConvNextModel checkpoint, whose keys have no prefix.
        stored = {BACKBONE_PREFIX + key.removeprefix(BACKBONE_PREFIX): key for key in reader.keys()}
        stored = {key: name for key, name in stored.items() if not name.startswith("classifier.")}
        missing = sorted(expected.keys() - stored.keys())
        unexpected = sorted(stored[key] for key in stored.keys() - expected.keys())
        problems = [f"{len(keys)} {kind} weight(s) ({', '.join(keys[:3])})"
                    for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
        if problems:
            raise CheckpointError(
                f"checkpoint '{source}' does not hold the backbone its ConvNeXt config describes: {'; '.join(problems)}"
            )
        for key, shape in expected.items():
            if reader.shape(stored[key]) != shape:
                raise CheckpointError(
                    f"shape mismatch for '{stored[key]}': {list(reader.shape(stored[key]))} in "
                    f"'{reader.path_of(stored[key])}' vs {list(shape)} in its config ({source})"
                )


def _plain(label: str) -> str:
    """Label spellings that name the same class: ``Annual_Crop`` and ``annual crop``."""
    return " ".join(str(label).lower().replace("_", " ").split())


def check_head_labels(config: Any, classnames: list[str], source: str) -> None:
    """A checkpoint's head must be for this task: same class count and, where named, same labels."""
    if config.num_labels != len(classnames):
        raise CheckpointError(
            f"checkpoint '{source}' has a {config.num_labels}-class head, but the task has {len(classnames)} classes"
        )
    names = [config.id2label[i] for i in range(config.num_labels)]
    generic = names == [f"LABEL_{i}" for i in range(config.num_labels)]
    if not generic and [_plain(name) for name in names] != [_plain(name) for name in classnames]:
        raise CheckpointError(
            f"checkpoint '{source}' was trained for other labels ({', '.join(names[:3])}, ...) "
            f"than the task's ({', '.join(classnames[:3])}, ...)"
        )


def check_export_target(target: Path, overwrite: bool, flag: str = "--overwrite true") -> None:
    """Refuse, before any work, to replace an existing output directory unless asked to."""
    if target.exists() and not overwrite:
        raise CheckpointError(f"output directory '{target}' already exists; pass {flag} to replace it")


def check_output_location(path: str | Path, option: str, atomic: bool = False) -> None:
    """Refuse, before any model or data is loaded, an output location the run could not write at
    its end: ``path`` must be a directory new files can be made in, or be creatable (its nearest
    existing ancestor such a directory). ``atomic``: ``path`` is replaced whole (``write_atomically``
    stages it in its parent), so the parent is what must take new files. Nothing is left behind.
    """
    path = Path(path)
    written = path.parent if atomic else path
    existing = next((p for p in (written, *written.parents) if p.exists() or p.is_symlink()), Path("."))
    if not existing.is_dir():
        raise CheckpointError(f"{option} '{path}' cannot be written: '{existing}' is not a directory")
    try:  # a real attempt: os.access says yes to root, under /proc too
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        raise CheckpointError(f"{option} '{path}' cannot be written: no new files in '{existing}' ({error.strerror})") from None


def write_atomically(
    target: Path, write: Callable[[Path], None], overwrite: bool, flag: str = "--overwrite true"
) -> None:
    """Run ``write(tmp_dir)`` and move the result to ``target``: it appears whole or not at all.

    The staging directory's name holds the writer's pid and host, so that the next write to
    ``target`` removes what killed writers left (``remove_dead_staging``) and no live one's.
    """
    check_export_target(target, overwrite, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(target)
    prefix = f".{target.name}.{os.getpid()}@{socket.gethostname()}."
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
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


def remove_dead_staging(target: Path) -> None:
    """Remove the staging directories of ``target`` whose writer ran on this host and is gone
    (killed: ``write_atomically`` had no chance to clean up). Another host's pids mean nothing here."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)@(.+)\.[^.]+")
    host = socket.gethostname()
    for path in target.parent.glob(f".{glob.escape(target.name)}.*@*"):
        match = pattern.fullmatch(path.name)
        if match and match[2] == host and path.is_dir() and not _process_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 and some writers 0600; an export is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
