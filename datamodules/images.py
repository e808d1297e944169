"""Which stored images can be read, checked before any is decoded, and where one that fails is.

The model's inputs are 8-bit RGB. Every image mode is read the way the Hugging Face
image-classification pipeline reads it (``transformers.image_utils.load_image``: PIL's
``convert("RGB")``, then the image processor), which ``tests/test_preprocessing.py`` checks
mode by mode, or refused: 16-bit, 32-bit and float pixels (``I;16``, ``I``, ``F``) would be
clipped to 0-255 by that conversion (16-bit digits lose 40 points of accuracy that way), and the
Hugging Face image processor itself refuses them.

``check_images`` looks at every image of a split from its header and its last bytes only,
without decoding it (0.03 ms a small PNG, 0.1 ms a DTD JPEG on one busy core: 10,000 images
in 0.3-1.2 s, a few percent of decoding them once): an empty file, a file that is no image,
a mode that cannot be read and a JPEG or PNG cut short are found before anything runs. An
image whose data is broken inside is only found when it is decoded, mid-run; ``unreadable``
then names it.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np
import pyarrow as pa
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image, UnidentifiedImageError

from datamodules.errors import DataError

#: PIL modes that ``convert("RGB")`` turns into 8-bit RGB without clipping anything (alpha is
#: dropped, as the pipeline drops it; a palette is looked up; CMYK, YCbCr, LAB, HSV converted).
READABLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"})

#: The last bytes of a whole file: a JPEG's end-of-image marker, a PNG's IEND chunk.
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82"}

#: Rows read from Arrow at a time by ``check_images``.
_CHUNK_ROWS = 1024


def mode_problem(mode: str) -> str | None:
    """Why images of PIL mode ``mode`` cannot be model inputs, or None."""
    if mode in READABLE_MODES:
        return None
    if mode.startswith("I;16") or mode in ("I", "F"):
        kind = {"I": "32-bit integer", "F": "32-bit float"}.get(mode, "16-bit")
        return (
            f"image mode '{mode}' ({kind} pixels) cannot be made 8-bit RGB without clipping it to 0-255 "
            "(the Hugging Face image processor refuses it): convert the images to 8 bits first"
        )
    return f"image mode '{mode}' cannot be made RGB"


def check_image_mode(image: Image.Image) -> None:
    """Refuse an image ``convert("RGB")`` would clip or cannot convert (see ``mode_problem``)."""
    problem = mode_problem(image.mode)
    if problem is not None:
        raise DataError(problem)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _stream_problem(stream: IO[bytes], size: int) -> str | None:
    if size == 0:
        return "empty (0 bytes)"
    try:
        image = Image.open(stream)  # reads the header only
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify it)"
    except Exception as error:  # a broken header, a decompression bomb: whatever PIL refuses to open
        return f"cannot open the image ({_first_line(error)})"
    with image:
        problem = mode_problem(image.mode)
        if problem is not None:
            return problem
        marker = _END_MARKERS.get(image.format or "")
        if marker is not None and size >= len(marker):
            stream.seek(size - len(marker))
            if stream.read(len(marker)) == marker:
                return None  # whole: only data broken inside is left, found when decoded
        try:  # no end marker to look at (or not there: trailing bytes, or cut short): decode to know
            image.load()
        except Exception as error:
            return f"the image data is cut short or broken ({_first_line(error)})"
    return None


def stored_image_problem(data: pa.Buffer | bytes | None, path: str | None) -> str | None:
    """Why a stored image (its bytes, or else its file) cannot be read, or None.

    Args:
        data: the image's bytes as stored in the dataset, or None when only its path is.
        path: the image's file (an image folder), or the name it was stored under.
    """
    if data is not None:
        return _stream_problem(io.BytesIO(data), len(data))  # a copy: PIL seeks as files allow
    if path is None:
        return "no image (neither bytes nor a path)"
    if "://" in path:  # a remote file: read when it is used
        return None
    try:
        with open(path, "rb") as stream:
            return _stream_problem(stream, os.fstat(stream.fileno()).st_size)
    except OSError as error:
        return f"cannot open the file ({error.strerror or _first_line(error)})"


def _locator(data: pa.Buffer | bytes | None, path: str | None, row: int) -> str:
    """``file '<path>'`` for an image folder's file, else ``row <n>`` (with the stored name)."""
    if data is None and path:
        return f"file '{path}'"
    return f"row {row}" + (f" ('{path}')" if path else "")


def _stored_images(data: Dataset, rows: Sequence[int]) -> Iterator[tuple[pa.Buffer | None, str | None]]:
    """``(bytes or None, path or None)`` of the image column at ``rows``, straight from Arrow
    (a run of consecutive rows without copying the bytes)."""
    view = data.select_columns(["image"]).with_format("arrow")
    for start in range(0, len(rows), _CHUNK_ROWS):
        part = np.asarray(rows[start : start + _CHUNK_ROWS])
        consecutive = bool(np.all(np.diff(part) == 1))
        table = view[int(part[0]) : int(part[-1]) + 1] if consecutive else view[part.tolist()]
        for chunk in table.column("image").chunks:
            fields = dict(zip((field.name for field in chunk.type), chunk.flatten()))  # the struct's offset applied
            blobs, paths = fields["bytes"], fields["path"]
            for index in range(len(chunk)):
                blob = blobs[index]
                yield (blob.as_buffer() if blob.is_valid else None), paths[index].as_py()


def image_digest(data: Dataset, rows: Sequence[int]) -> str:
    """SHA-256 of the images at ``rows`` of ``data`` as they are stored, in that order: each row's
    bytes (length first), or for an image folder's row, which stores a path, that file's bytes (a
    remote file's path stands for it). What is hashed is what decoding reads, so two splits with
    one digest decode to the same images; nothing is decoded (about 1 GB/s on one core)."""
    digest = hashlib.sha256()
    for blob, path in _stored_images(data, rows):
        if blob is None and path is not None and "://" not in path:
            with open(path, "rb") as stream:
                blob = stream.read()
        content = blob if blob is not None else f"path:{path}".encode()
        digest.update(len(content).to_bytes(8, "little"))
        digest.update(content)
    return digest.hexdigest()


def check_image_column(data: Dataset, where: str) -> None:
    """The ``image`` column of ``data`` holds images to decode (``datasets.Image``), in a mode that can be read."""
    feature = data.features["image"]
    if not isinstance(feature, ImageFeature) or not feature.decode:
        raise DataError(
            f"{where}: the image column holds {feature!r}, not images to decode "
            "(make it one with dataset.cast_column('image', datasets.Image()))"
        )
    if feature.mode and mode_problem(feature.mode):  # datasets converts every image to it
        raise DataError(f"{where}: the image column converts every image to mode '{feature.mode}': {mode_problem(feature.mode)}")


def check_images(data: Dataset, where: str, rows: np.ndarray | None = None) -> None:
    """Every image at ``rows`` (default: all) of ``data`` can be opened, has a mode that can be
    read and, for a JPEG or PNG, ends where such a file ends; one ``DataError`` names the first
    that cannot, and how many cannot. Nothing is decoded but an image without an end marker.

    Args:
        data: a split with an ``image`` column (``datasets.Image``).
        where: the split, as error messages name it (``task 'dtd', path '...', split 'train'``).
        rows: the rows that will be read.
    """
    check_image_column(data, where)
    rows = np.arange(len(data)) if rows is None else np.asarray(rows)
    first, count = None, 0
    for row, (blob, path) in zip(rows, _stored_images(data, rows)):
        problem = stored_image_problem(blob, path)
        if problem is not None:
            count += 1
            first = first or f"{_locator(blob, path, int(row))}: {problem}"
    if first is not None:
        more = f"; {count} image(s) of this split cannot be read" if count > 1 else ""
        raise DataError(f"{where}, {first}{more}")


def unreadable(data: Dataset, row: int, where: str, error: BaseException) -> str:
    """The one-line message for an image that failed when it was decoded or preprocessed."""
    (blob, path), *_ = _stored_images(data, [row])
    reason = str(error) if isinstance(error, DataError) else f"cannot read the image ({_first_line(error)})"
    return f"{where}, {_locator(blob, path, row)}: {reason}"


@dataclass(frozen=True)
class UnreadableBatch:
    """What a DataLoader batch is when one of its images could not be read: its message.

    Raised in a worker process, the error would reach the main process as a multi-line copy
    of the worker's traceback; carried as this batch instead, the loader raises it in the main
    process as the one-line ``DataError`` it is (``datamodules.loaders.CheckedDataLoader``)."""

    message: str
