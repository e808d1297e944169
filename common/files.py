"""Output files and directories that appear whole or not at all, and output locations checked
before any work."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from safetensors import SafetensorError

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


def write_atomically(
    target: Path, write: Callable[[Path], None], overwrite: bool, flag: str = "--overwrite true", what: str | None = None
) -> None:
    """Run ``write(tmp_dir)`` and move the result to ``target``: it appears whole or not at all.

    The staging directory's name holds the writer's pid and host, so that the next write to
    ``target`` removes what killed writers left (``remove_dead_staging``) and no live one's. A
    write the file system refuses (a full disk, a quota, a read-only mount) is one
    ``CheckpointError`` naming ``target`` (and ``what``, the option that chose it), with the
    staging directory and the parent directories made for it removed.
    """
    check_export_target(target, overwrite, flag)
    made = [path for path in target.parents if not path.exists()]
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
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        reason = write_failure(error, staging)
        if reason is None:
            raise
        where = f"{what} '{target}'" if what else f"'{target}'"
        raise CheckpointError(f"cannot write {where}: {reason}; nothing was written there") from error


def _remove_empty(made: list[Path]) -> None:
    """Remove the directories a failed write made (``made``: innermost first), as far as they
    are empty: a directory another writer filled meanwhile stays."""
    for path in made:
        try:
            path.rmdir()
        except OSError:
            break


def write_failure(error: BaseException, staging: Path) -> str | None:
    """Why the file system refused a write (``No space left on device``), or None where
    ``error`` is not such a refusal; a file it names outside ``staging`` (where the failed
    write went, removed by now) is named too. safetensors reports its I/O errors as a
    ``SafetensorError`` (``Error while serializing: I/O error: No space left on device (os
    error 28)``), not an ``OSError``."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        named = isinstance(error.filename, str | bytes | os.PathLike) and not Path(os.fsdecode(error.filename)).is_relative_to(
            staging
        )
        return f"{reason} ('{os.fsdecode(error.filename)}')" if named else reason
    if isinstance(error, SafetensorError) and "I/O error: " in str(error):
        return str(error).split("I/O error: ", 1)[1]
    return None


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


def _shared_mode(directory: bool) -> int:
    """The mode a new file (``directory`` False) or directory gets from ``open``/``mkdir`` under
    the current umask: ``mkstemp`` and ``mkdtemp`` make theirs private (0600, 0700), and an
    output is meant to be shared like any other file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 and some writers 0600; an export is meant to be shared."""
    directory.chmod(_shared_mode(directory=True))
    for path in directory.rglob("*"):
        path.chmod(_shared_mode(directory=path.is_dir()))


def write_files_atomically(directory: Path, writers: Mapping[str, Callable[[Path], None]], what: str) -> None:
    """Files that appear together, whole, or not at all: ``writers[name](path)`` writes the file
    ``name`` of ``directory`` to ``path``, a staging file beside it; only when every one is
    written are they renamed into place (a rename takes no space). On any failure the staging
    files and the directories made for them are removed and files already there stay as they
    were; a write the file system refuses is one ``CheckpointError`` naming ``what`` (the
    option), the directory and the file. The files get the mode ``open`` would give them.
    """
    directory = Path(directory)
    made = [path for path in (directory, *directory.parents) if not path.exists()]
    staged: list[Path] = []
    name = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, write in writers.items():
            handle, temporary = tempfile.mkstemp(prefix=f".{Path(name).stem}.", suffix=Path(name).suffix, dir=directory)
            os.close(handle)
            staged.append(Path(temporary))
            write(staged[-1])
            staged[-1].chmod(_shared_mode(directory=False))
        for name, path in zip(writers, staged):
            os.replace(path, directory / name)
    except BaseException as error:
        for path in staged:
            path.unlink(missing_ok=True)
        _remove_empty(made)
        reason = write_failure(error, directory)
        if reason is None:
            raise
        file = f" ({name})" if name is not None else ""
        raise CheckpointError(f"cannot write {what} '{directory}'{file}: {reason}; nothing was written there") from error
