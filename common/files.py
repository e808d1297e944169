"""Output files and directories that appear whole or not at all, and output locations checked
before any work."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.errors import CheckpointError


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


def write_atomically(target: Path, write: Callable[[Path], None], overwrite: bool, flag: str = "--overwrite true") -> None:
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


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole, or keeps what it held: written beside it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
