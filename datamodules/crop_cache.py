"""An opt-in cache of the evaluation's preprocessed crops (``--data.crop_cache DIR``), exact.

On a GPU the evaluation waits for JPEG decoding and PIL's resize (``benchmarks/README.md``). The
cache keeps, per task and evaluated split, the uint8 crops ``ImagePreprocessor.to_uint8_array``
makes (resize and centre crop, before normalisation) in one NumPy ``.npy`` array of shape
``(images, height, width, 3)``, memory-mapped when read. ``normalize`` still runs on every crop of
every batch, through the same tensor view as a freshly decoded crop
(``ImagePreprocessor.array_to_tensor``), so the model's inputs are bit for bit the ones decoding
gives (``tests/test_crop_cache.py``).

**Key.** An entry holds the crops of one key, which is written whole in its ``key.json``:

- what the images are: the SHA-256 of every row's stored image bytes in row order
  (``datamodules.images.image_digest``: the bytes the dataset holds, or an image folder's files),
  the number of rows and the image column's conversion mode. The hash is of what would be
  decoded, read from Arrow without decoding, about 1 GB/s on one core, once per run. (``datasets``'
  own fingerprint, ``Dataset._fingerprint``, is private, and ``Dataset.cache_files`` names files,
  not what they hold; a dataset built in memory has none.) A validation split's rows are the
  held-out rows of train in order, which the hash covers too;
- the task and the split (``test`` or ``validation``);
- every preprocessing setting that changes pixels (``ImagePreprocessor.pixel_settings``: the
  processor class, size, crop_pct, crop_size, resample, do_convert_rgb) and the Pillow version
  (its resampling makes the pixels);
- the cache format's version, and the array's shape and dtype.

The entry is the directory ``<task>-<split>-<16 hex digits of the key's hash>`` under the cache
directory, holding ``crops.npy`` and ``key.json``. A key that changes is another directory; an
entry whose ``key.json`` holds another key, or whose array header disagrees with it, is rebuilt and
never read; one that cannot be read at all (``key.json`` not JSON, ``crops.npy`` not an array or
cut short) is an error naming it, to be deleted.

**Writing.** The size is printed in one line first; a disk without that much room
(``shutil.disk_usage``) refuses it with one error. The files are written with plain writes (a
write through a memory map would die of SIGBUS on a full disk instead of raising), flushed to disk,
in a hidden staging directory that is renamed into place (``common.files.write_atomically``): an
interrupted write leaves only the staging directory, which no reader opens and the next write
removes; a full disk is one error and nothing there. The crops are made by a DataLoader with the
run's ``data.num_workers``. With several processes, Lightning's ``prepare_data`` builds on one
process per node and the others read the entry once it is there.

A suggested place: ``outputs/crop_cache`` (beside the runs' other outputs), or under ``$HF_HOME``
beside the datasets they are made from. 224-pixel crops take 150,528 bytes an image: about 13 GB
for the eight tasks' test sets and 35 GB for TALL20's (``benchmarks/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from common.files import write_atomically
from datamodules.errors import DataError

#: The version of the entries' layout; a change makes every key another one.
CACHE_FORMAT = 1
CROPS_FILE = "crops.npy"
KEY_FILE = "key.json"


def cache_key(
    task: str,
    split: str,
    image_sha256: str,
    image_mode: str | None,
    pixel_settings: Mapping[str, Any],
    crop: tuple[int, int],
    rows: int,
) -> dict[str, Any]:
    """The key of one split's crops (see the module's docstring), as ``key.json`` holds it.

    Args:
        task: the task's name.
        split: ``test`` or ``validation``.
        image_sha256: ``datamodules.images.image_digest`` of the rows read, in order.
        image_mode: the image column's conversion mode (``datasets.Image(mode=...)``), or None.
        pixel_settings: ``ImagePreprocessor.pixel_settings``.
        crop: ``(height, width)`` of every crop.
        rows: the number of images.
    """
    return {
        "format": CACHE_FORMAT,
        "task": task,
        "split": split,
        "images": rows,
        "image_sha256": image_sha256,
        "image_mode": image_mode,
        "preprocessing": dict(pixel_settings),
        "pillow": PIL.__version__,
        "shape": [rows, crop[0], crop[1], 3],
        "dtype": "uint8",
    }


def crop_bytes(key: Mapping[str, Any]) -> int:
    """The size of an entry's crops, without the array header."""
    return int(np.prod(key["shape"]))


class CropCache:
    """Entries of uint8 crops under ``directory``, one per key (``cache_key``).

    Args:
        directory: the cache directory (``data.crop_cache``); made when the first entry is written.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    def entry(self, key: Mapping[str, Any]) -> Path:
        """The directory of ``key``'s entry: ``<task>-<split>-<16 hex digits of the key's hash>``."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.directory / f"{key['task']}-{key['split']}-{digest}"

    def read(self, key: Mapping[str, Any]) -> Path | None:
        """The crops file of ``key``'s entry, checked, or None where there is none or it must be
        rebuilt (another key, another array header: said in one line).

        Raises:
            DataError: the entry cannot be read (not JSON, not an array, cut short).
        """
        entry = self.entry(key)
        if not entry.exists():
            return None
        try:
            stored = json.loads((entry / KEY_FILE).read_text())
            crops = np.load(entry / CROPS_FILE, mmap_mode="r")
        except (OSError, ValueError, EOFError) as error:  # ValueError: json's, or numpy's on a bad or short file
            raise DataError(
                f"data.crop_cache entry '{entry}' cannot be read ({type(error).__name__}: {error}): delete it, and the "
                "next run rebuilds it"
            ) from None
        if not isinstance(stored, dict):
            raise DataError(
                f"data.crop_cache entry '{entry}': {KEY_FILE} holds no key: delete the entry, and the next run rebuilds it"
            )
        header = {"shape": list(crops.shape), "dtype": str(crops.dtype)}
        del crops  # the map is reopened by every process that reads it
        if stored != dict(key):
            differ = sorted(name for name in {*key, *stored} if stored.get(name) != key.get(name))
        else:  # the key's, over an array that is not its
            differ = [name for name, value in header.items() if value != key[name]]
        if differ:
            print(f"crop cache: '{entry}' holds other crops ({', '.join(differ)} differ); rebuilding it", flush=True)
            return None
        return entry / CROPS_FILE

    def check_room(self, key: Mapping[str, Any]) -> None:
        """Refuse, before writing, an entry the disk has no room for."""
        existing = next((path for path in (self.directory, *self.directory.parents) if path.exists()), Path("."))
        free = shutil.disk_usage(existing).free
        needed = crop_bytes(key)
        if needed > free:
            raise DataError(
                f"data.crop_cache '{self.directory}': the {key['images']:,} crops of task '{key['task']}', split "
                f"'{key['split']}' need {needed:,} bytes and the disk has {free:,} free: free some space, point "
                "data.crop_cache elsewhere, or leave it unset"
            )

    def write(self, key: Mapping[str, Any], batches: Iterable[np.ndarray]) -> Path:
        """Write ``key``'s entry from ``batches`` (``(n, height, width, 3)`` uint8 crops in row order),
        whole or not at all; returns its crops file.

        Raises:
            DataError: the disk has no room for it (checked first).
            CheckpointError: the file system refused a write (a full disk): nothing is left there.
        """
        self.check_room(key)
        entry = self.entry(key)
        print(
            f"crop cache: writing the {key['images']:,} crops of task '{key['task']}', split '{key['split']}' "
            f"({crop_bytes(key):,} bytes, {crop_bytes(key) / 1e9:.2f} GB) to '{entry}'",
            flush=True,
        )
        write_atomically(entry, lambda staging: _write_entry(staging, key, batches), overwrite=True, what="data.crop_cache")
        return entry / CROPS_FILE


def _write_entry(staging: Path, key: Mapping[str, Any], batches: Iterable[np.ndarray]) -> None:
    """``crops.npy`` (NumPy's own header, then the rows) and ``key.json`` in ``staging``, on disk."""
    shape = tuple(key["shape"])
    written = 0
    with open(staging / CROPS_FILE, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                    "fortran_order": False, "shape": shape})  # fmt: skip
        for batch in batches:
            if batch.dtype != np.uint8 or batch.shape[1:] != shape[1:]:
                raise ValueError(f"a batch of {batch.dtype} crops {batch.shape[1:]}, not uint8 {shape[1:]}")
            file.write(np.ascontiguousarray(batch).data)
            written += len(batch)
        if written != shape[0]:
            raise ValueError(f"{written} crops made for {shape[0]} images")
        file.flush()
        os.fsync(file.fileno())  # on disk before the rename makes it an entry
    with open(staging / KEY_FILE, "w") as file:
        file.write(json.dumps(key, indent=2) + "\n")
        file.flush()
        os.fsync(file.fileno())
