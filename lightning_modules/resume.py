"""The checkpoint ``--ckpt_path`` names, checked before anything is read or written: a file given
loads (``ProjectCLI.parse_arguments``: LightningCLI reads it next), and the one fit resumes from
(``ProjectCLI.before_fit``) is one file, loadable, and for ``train.py`` a checkpoint of the
classifier being trained. Lightning would find out only after the data, the logger and
``config.yaml`` are set up, and then with a traceback; for ``--ckpt_path last`` it takes the
newest ``last*.ckpt`` without a word."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from common.errors import CheckpointError
from lightning_modules.classifier import ImageClassifier

#: Keys named in a message, at most.
SHOWN = 2


def is_local(ckpt_path: str) -> bool:
    """A file this machine reads directly (not ``s3://...``, not a model registry's name)."""
    return "://" not in ckpt_path and not ckpt_path.startswith("registry")


def read_checkpoint(path: str | Path, where: str) -> dict[str, Any]:
    """The checkpoint at ``path``, its tensors memory-mapped (nothing is read but the pickle and
    the archive's index), loaded as Lightning will load it (``weights_only``, the default of
    ``torch.load``). A truncated file has lost the archive's index at its end: it fails here.

    Args:
        path: a local checkpoint file.
        where: the file as the message names it (``--ckpt_path 'x.ckpt'``).
    """
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose index is at its end
        raise CheckpointError(f"{where} cannot be loaded: truncated, or not a checkpoint (not a whole zip archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which Lightning does not use either
        reason = "torch.load with weights_only, as Lightning loads it, cannot unpickle it"
        raise CheckpointError(f"{where} cannot be loaded: corrupt, or not a checkpoint ({reason})") from None
    except Exception as error:  # a RuntimeError from the zip reader, an EOFError, ...
        reason = str(error).split(". ")[0].strip() or type(error).__name__
        raise CheckpointError(f"{where} cannot be loaded: corrupt, or not a checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{where} is not a Lightning checkpoint (it has no 'state_dict')")
    return checkpoint


def check_given_checkpoint(config: Any) -> None:
    """A ``--ckpt_path`` file loads: LightningCLI reads its hyper-parameters right after parsing
    (for any subcommand), where a truncated file would end in torch's traceback.

    Args:
        config: the parsed configuration (``LightningCLI.config``).
    """
    subcommand = config.get("subcommand")
    ckpt_path = config[subcommand].get("ckpt_path") if subcommand else None
    if isinstance(ckpt_path, str) and is_local(ckpt_path) and Path(ckpt_path).is_file():
        read_checkpoint(ckpt_path, f"--ckpt_path '{ckpt_path}'")


def one_last_checkpoint(found: Iterable[str]) -> str | None:
    """The one file ``--ckpt_path last`` resumes from, of the candidates Lightning considers (each
    ``ModelCheckpoint``'s ``last*.ckpt``, an ``OnExceptionCheckpoint``'s file); None where none
    exists. Several are refused, naming each with its step: Lightning would take the newest, which
    may be a stray ``last-v1.ckpt`` of a restarted run at step 2 beside the ``last.ckpt`` at step 12."""
    existing = sorted({os.path.normpath(path) for path in found if path and Path(path).is_file()})
    if len(existing) <= 1:
        return existing[0] if existing else None
    newest = max(existing, key=os.path.getmtime)
    described = []
    for path in existing:
        try:
            where = f"step {read_checkpoint(path, repr(path))['global_step']}"
        except (CheckpointError, KeyError):
            where = "not loadable"
        described.append(f"'{path}' ({where}{', the newest' if path == newest else ''})")
    raise CheckpointError(
        f"--ckpt_path last: {len(existing)} files could be the last checkpoint, {', '.join(described)}; "
        "give the one to resume from as --ckpt_path <file>"
    )


def check_resume_file(path: str, model: LightningModule | None, ckpt_path: str) -> None:
    """``path`` loads, and where the model is a fine-tuning ``ImageClassifier`` (whose weights all
    exist once it is built; a merge model builds its own in ``setup``), holds exactly its weights,
    each of its shape.

    Args:
        path: the local checkpoint file fit will resume from.
        model: the model fit will train; None checks only that the file loads.
        ckpt_path: ``--ckpt_path`` as given (the file, or ``last``), for the message.
    """
    where = f"--ckpt_path '{path}'" if ckpt_path == path else f"--ckpt_path {ckpt_path}: '{path}'"
    checkpoint = read_checkpoint(path, where)
    if isinstance(model, ImageClassifier):
        check_same_weights(checkpoint["state_dict"], model.state_dict(), where, type(model).__name__)


def check_same_weights(saved: dict[str, Any], expected: dict[str, torch.Tensor], where: str, model_name: str) -> None:
    """``saved`` (a checkpoint's state dict) has the keys of ``expected`` (the model's), each of its shape."""
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(expected)} weights are not in it ({_keys(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} of its {len(saved)} are not the model's ({_keys(unexpected)})")
        raise CheckpointError(f"{where} is not a checkpoint of {model_name}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        shape = getattr(saved[key], "shape", None)
        if shape is not None and tuple(shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{where} is not a checkpoint of this {model_name}: '{key}' is {list(shape)} there and "
                f"{list(tensor.shape)} here (another task's head, or another model?)"
            )


def _keys(keys: list[str]) -> str:
    shown = ", ".join(f"'{key}'" for key in keys[:SHOWN])
    return shown + (", ..." if len(keys) > SHOWN else "")
