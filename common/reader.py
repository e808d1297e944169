"""Read a checkpoint one tensor at a time, into memory the caller owns.

``safetensors.safe_open`` memory-maps the file, and every page a merge touches then counts
in the process's resident memory until the file is closed: merging eight base-sized models
key by key would hold all eight files (about 2.8 GB) resident. This reader parses the same
format (an 8-byte header length, a JSON header of dtype/shape/offsets, then raw bytes) and
reads each tensor with ``preadv`` straight into a tensor's buffer, so memory is what the
merge allocates and nothing more. Sharded checkpoints (``model.safetensors.index.json``) and,
as a fallback, ``pytorch_model.bin`` are read through the same interface.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from common.errors import CheckpointError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class _SafetensorsFile:
    """One ``.safetensors`` file: header parsed and checked up front, tensors read on demand.
    Its descriptor is closed by ``close``, or when the object is garbage collected (a reader
    a ``ModelPool`` holds lives as long as the pool, and nothing has to remember to close it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise CheckpointError(f"cannot open '{path}': {error.strerror}") from error
        self._closer = weakref.finalize(self, os.close, self.fd)
        size = os.fstat(self.fd).st_size
        prefix = os.pread(self.fd, 8, 0)
        if len(prefix) < 8:
            self._fail(f"file of {size} bytes is too short for a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(size - 8, _MAX_HEADER_BYTES):
            self._fail(f"header length {header_size} exceeds the file size {size} (truncated or not safetensors)")
        try:
            header = json.loads(os.pread(self.fd, header_size, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._fail(f"unreadable header ({error})")
        if not isinstance(header, dict):
            self._fail(f"the header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_size
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                name, shape = info["dtype"], tuple(int(n) for n in info["shape"])
                begin, end = (int(n) for n in info["data_offsets"])
            except (TypeError, KeyError, ValueError):
                self._fail(f"tensor '{key}' has a malformed header entry {str(info)[:200]}")
            dtype = _DTYPES.get(name)
            if dtype is None:
                self._fail(f"tensor '{key}' has unsupported dtype {name}")
            expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if begin < 0 or end - begin != expected or self.data_start + end > size:
                self._fail(
                    f"tensor '{key}' ({info['dtype']}{list(shape)}) needs bytes {begin}-{end} of the data "
                    f"but the file has {size - self.data_start} (truncated or corrupt)"
                )
            self.entries[key] = (dtype, shape, begin, end)

    def _fail(self, reason: str) -> None:
        self.close()
        raise CheckpointError(f"corrupt checkpoint '{self.path}': {reason}")

    def read_into(self, key: str, out: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Entries ``start:stop`` of ``key`` (flattened, row-major; all by default) into ``out``."""
        dtype, _, begin, end = self.entries[key]
        if stop is not None:
            end = begin + stop * dtype.itemsize
        begin += start * dtype.itemsize
        if os.preadv(self.fd, [_bytes_of(out)], self.data_start + begin) != end - begin:
            raise CheckpointError(f"corrupt checkpoint '{self.path}': short read of tensor '{key}'")
        return out

    def close(self) -> None:
        self._closer()  # a finalizer runs once: closing twice, or after collection, is a no-op


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as writable bytes."""
    try:
        return memoryview(tensor.numpy()).cast("B")  # the quick way, where numpy has the dtype
    except TypeError:  # bfloat16, or a shape with a 0 in it
        return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


class CheckpointReader:
    """Tensors of a Hugging Face checkpoint directory, by key.

    Args:
        directory: holds ``model.safetensors``, sharded safetensors with their index, or
            ``pytorch_model.bin``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._files: dict[str, _SafetensorsFile] = {}
        self._key_file: dict[str, str] = {}
        self._legacy: dict[str, torch.Tensor] | None = None
        single = self.directory / "model.safetensors"
        index = self.directory / "model.safetensors.index.json"
        if single.is_file():
            self._add_file(single)
        elif index.is_file():
            try:
                for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                    self._add_file(self.directory / shard)
            except BaseException:  # a bad shard: the ones opened before it are closed now
                self.close()
                raise
        elif (self.directory / "pytorch_model.bin").is_file():
            self._legacy = self._load_legacy(self.directory / "pytorch_model.bin")
        else:
            raise CheckpointError(f"checkpoint '{self.directory}' has no model.safetensors (nor pytorch_model.bin)")

    def _add_file(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"checkpoint shard '{path}' is missing")
        handle = _SafetensorsFile(path)
        self._files[path.name] = handle
        for key in handle.entries:
            self._key_file[key] = path.name

    @staticmethod
    def _load_legacy(path: Path) -> dict[str, torch.Tensor]:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:  # pickle/zip errors of a damaged file
            raise CheckpointError(f"corrupt checkpoint '{path}': {type(error).__name__}: {error}") from error

    def keys(self) -> list[str]:
        return list(self._legacy) if self._legacy is not None else list(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in (self._legacy if self._legacy is not None else self._key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._legacy is not None:
            return tuple(self._legacy[key].shape)
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        if self._legacy is not None:
            return self._legacy[key].dtype
        return self._entry(key)[0]

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if key not in self._key_file:
            raise CheckpointError(f"checkpoint '{self.directory}' has no tensor '{key}'")
        return self._files[self._key_file[key]].entries[key]

    def path_of(self, key: str) -> Path:
        """The file holding ``key``; the checkpoint directory where no file has it."""
        if self._legacy is not None:
            return self.directory / "pytorch_model.bin"
        return self.directory / self._key_file[key] if key in self._key_file else self.directory

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``, in its stored dtype; into ``out`` (same dtype and size) when given."""
        if self._legacy is not None:
            tensor = self._legacy[key]
            return out.copy_(tensor) if out is not None else tensor.clone()
        dtype, shape, _, _ = self._entry(key)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        return self._files[self._key_file[key]].read_into(key, out.view(shape))

    def read_slice(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Entries ``start:stop`` of ``key`` flattened (row-major), in its stored dtype, as a
        1-D tensor; into ``out`` (same dtype, ``stop - start`` entries) when given."""
        if self._legacy is not None:
            entries = self._legacy[key].reshape(-1)[start:stop]
            return out.copy_(entries) if out is not None else entries.clone()
        dtype, _, _, _ = self._entry(key)
        if out is None:
            out = torch.empty(stop - start, dtype=dtype)
        return self._files[self._key_file[key]].read_into(key, out, start, stop)

    def items(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys if keys is not None else self.keys():
            yield key, self.read(key)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
