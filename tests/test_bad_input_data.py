"""Bad data through the real CLIs (``train.py``, ``merge.py``, in-process): images that cannot be
read (16-bit and other modes, empty files, files that are no image, images cut short or broken
inside) in the train or test split or among AdaMerging's images, labels that are no whole class
number, and a held-out fraction that holds out nothing.

Every case ends in one ``error:`` line naming what is wrong and where (the file of an image
folder, the split and row of a dataset that stores its images), exit status 1, and nothing
written in the working directory or the output paths. An image broken inside is only found
when it is decoded, mid-run: then too one line, with data loader workers or without.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_from_disk
from PIL import Image as PILImage

import merge_fixtures as mf
import test_bad_input as bad_input
from conftest import write_dataset
from datamodules.classification import _fraction_for
from datamodules.tasks import get_task
from merge import main as merge_main
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

# tests/test_bad_input.py's fixtures (the tiny ConvNeXt, the merge pool, the empty working directory
# every test runs in) and helpers: one pattern for every bad-input test.
convnext, pool, workdir = bad_input.convnext, bad_input.pool, bad_input.workdir
MERGE_TASKS, Pool, train_args = bad_input.MERGE_TASKS, bad_input.Pool, bad_input.train_args
one_error_line, assert_nothing_written = bad_input.one_error_line, bad_input.assert_nothing_written


# --- stored images: whole ones and broken ones -------------------------------------------------


def encoded(image: PILImage.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def gray_png(value: int) -> bytes:
    return encoded(PILImage.new("L", (8, 8), value), "PNG")


def noise(seed: int, size: int = 32) -> PILImage.Image:
    return PILImage.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def broken_inside_jpeg() -> bytes:
    """A JPEG whose header and end marker are whole, with bytes of its image data overwritten:
    only decoding it finds that it is broken."""
    data = bytearray(encoded(noise(0), "JPEG", quality=95))
    rng = np.random.default_rng(1)
    start = data.index(b"\xff\xda") + 20  # inside the scan, after its header
    for position in rng.integers(start, len(data) - 2, 200):
        data[position] = int(rng.integers(256))
    data = bytes(data)
    with PILImage.open(io.BytesIO(data)) as image:  # the header reads, the end marker is there ...
        assert image.format == "JPEG" and data.endswith(b"\xff\xd9")
        with pytest.raises(OSError, match="broken data stream"):  # ... and decoding fails
            image.load()
    return data


#: case -> (the stored bytes, the reason the error line gives)
BROKEN = {
    "an empty file": (lambda: b"", "empty (0 bytes)"),
    "a file that is no image": (lambda: b"<html><body>404 Not Found</body></html>", "not an image (PIL cannot identify it)"),
    "a PNG cut short": (
        lambda: encoded(noise(2), "PNG")[:1500],
        "the image data is cut short or broken (OSError: image file is truncated)",
    ),
    "a JPEG cut short": (
        lambda: encoded(noise(3), "JPEG", quality=95)[:1500],
        "the image data is cut short or broken (OSError: image file is truncated (",
    ),
}


def image_folder(root: Path, images: dict[str, list[bytes]], classes: int) -> Path:
    """``<split>/<class>/<row>.png`` from each split's stored images; row ``i`` is in class ``i % classes``."""
    for split, blobs in images.items():
        for row, blob in enumerate(blobs):
            folder = root / split / str(row % classes)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{row:04d}.png").write_bytes(blob)
    return root


def stored_dataset(
    images: dict[str, list[bytes]], task: str, labels: dict[str, list] | None = None, label_type=None
) -> DatasetDict:
    """Each split's images stored as bytes, as they are (not decoded or checked on the way in)."""
    names = list(get_task(task).classnames)
    features = Features({"image": Image(), "label": label_type or ClassLabel(names=names)})
    splits = {}
    for split, blobs in images.items():
        column = labels[split] if labels else [row % len(names) for row in range(len(blobs))]
        rows = {"image": [{"bytes": blob, "path": None} for blob in blobs], "label": column}
        splits[split] = Dataset.from_dict(rows, features=features)
    return DatasetDict(splits)


def good_images(count: int) -> list[bytes]:
    return [gray_png(row) for row in range(count)]


def with_image(blobs: list[bytes], row: int, blob: bytes) -> list[bytes]:
    return [blob if index == row else image for index, image in enumerate(blobs)]


def digits_folder(tmp_path: Path, split: str, row: int, blob: bytes, suffix: str, train: int = 8) -> tuple[Path, Path]:
    """A digits image folder (``train`` train, 4 test PNGs) with ``blob`` as ``row`` of ``split``
    (a file ending in ``suffix``); and that file."""
    root = image_folder(tmp_path / "digits", {"train": good_images(train), "test": good_images(4)}, classes=10)
    file = root / split / str(row) / f"{row:04d}.png"
    file.unlink()
    file = file.with_suffix(suffix)
    file.write_bytes(blob)
    return root, file


# --- 1. a file of an image folder that cannot be read: found before anything runs ----------------


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("case", BROKEN)
def test_an_image_file_that_cannot_be_read_is_one_error_line(case, split, convnext, tmp_path, workdir, capsys):
    blob, reason = BROKEN[case]
    suffix = ".jpg" if "JPEG" in case else ".png"
    root, file = digits_folder(tmp_path, split, 3, blob(), suffix)
    line = one_error_line(train_main, train_args(convnext, root, "digits"), capsys)
    assert line.startswith(f"error: task 'digits', path '{root}', split '{split}', file '{file}': {reason}"), line
    assert not list(workdir.iterdir())


@pytest.mark.parametrize("form", ["disk", "parquet"])
def test_a_stored_image_that_cannot_be_read_names_its_split_and_row(form, convnext, tmp_path, workdir, capsys):
    images = {"train": good_images(8), "test": with_image(good_images(4), 2, b"")}
    images["train"] = with_image(with_image(images["train"], 5, b"not an image"), 6, b"")
    data = write_dataset(stored_dataset(images, "mnist"), tmp_path / "mnist", form)
    line = one_error_line(train_main, train_args(convnext, data, "mnist"), capsys)
    # the first of them, and how many there are in that split
    assert line == (f"error: task 'mnist', path '{data}', split 'train', row 5: not an image (PIL cannot identify it); "
                    "2 image(s) of this split cannot be read")  # fmt: skip
    assert not list(workdir.iterdir())


# --- 2. image modes that would be clipped to 8-bit RGB ------------------------------------------


def sixteen_bit_png(value: int) -> bytes:
    image = PILImage.fromarray(np.full((8, 8), value * 250, dtype=np.uint16))
    assert image.mode == "I;16"
    return encoded(image, "PNG")


def test_16_bit_pngs_are_one_error_line(convnext, tmp_path, workdir, capsys):
    """The issue's case: 16-bit digits were clipped when made RGB, trained to 50.70% instead of 90.25%, exit 0."""
    images = {split: [sixteen_bit_png(row) for row in range(count)] for split, count in (("train", 8), ("test", 4))}
    root = image_folder(tmp_path / "digits16", images, classes=10)
    line = one_error_line(train_main, train_args(convnext, root, "digits"), capsys)
    assert line == (
        f"error: task 'digits', path '{root}', split 'train', file '{root / 'train' / '0' / '0000.png'}': image mode 'I;16' "
        "(16-bit pixels) cannot be made 8-bit RGB without clipping it to 0-255 (the Hugging Face image processor refuses it): "
        "convert the images to 8 bits first; 8 image(s) of this split cannot be read"
    )
    assert not list(workdir.iterdir())


@pytest.mark.parametrize(("dtype", "mode", "kind"), [(np.int32, "I", "32-bit integer"), (np.float32, "F", "32-bit float")])
def test_32_bit_tiffs_are_one_error_line(dtype, mode, kind, convnext, tmp_path, workdir, capsys):
    tiff = encoded(PILImage.fromarray(np.full((8, 8), 1000, dtype=dtype)), "TIFF")
    images = {"train": with_image(good_images(8), 4, tiff), "test": good_images(4)}
    data = write_dataset(stored_dataset(images, "mnist"), tmp_path / "mnist", "disk")
    line = one_error_line(train_main, train_args(convnext, data, "mnist"), capsys)
    assert line.startswith(f"error: task 'mnist', path '{data}', split 'train', row 4: image mode '{mode}' ({kind} pixels) "), (
        line
    )
    assert not list(workdir.iterdir())


# --- 3. an image broken inside: found when it is decoded, mid-run ---------------------------------


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split", ["train", "test"])
def test_an_image_broken_inside_is_one_error_line_mid_run(split, workers, convnext, tmp_path, workdir, capsys):
    root, file = digits_folder(tmp_path, split, 3, broken_inside_jpeg(), ".jpg", train=4)
    # train: the first step reads all 4 images of the batch; test: the sanity check before it, all 4
    args = train_args(convnext, root, "digits", f"--data.num_workers={workers}", "--export_dir", str(tmp_path / "exports"))
    line = one_error_line(train_main, [*args, "--data.eval_batch_size=4"], capsys)
    assert line == (f"error: task 'digits', path '{root}', split '{split}', file '{file}': "
                    "cannot read the image (OSError: broken data stream when reading image file)")  # fmt: skip
    assert not list(workdir.iterdir()), "no config.yaml, no checkpoint of the failed run"
    assert not (tmp_path / "exports").exists()


# --- 4. the merge side: test images (merge.py test) and AdaMerging's images (merge.py fit) -------


def dtd_test_set(pool: Pool, tmp_path: Path, row: int, blob: bytes) -> str:
    """The pool's dtd test set with ``blob`` as the image of ``row``."""
    data = load_from_disk(pool.data["dtd"])["test"].cast_column("image", Image(decode=False))
    images = with_image([image["bytes"] for image in data["image"]], row, blob)
    split = stored_dataset({"test": images}, "dtd", labels={"test": data["label"]})
    split.save_to_disk(str(tmp_path / "dtd"))
    return str(tmp_path / "dtd")


def merge_run(pool: Pool, out: Path, data: dict[str, str], command: str, *extra: str) -> list[str]:
    """``merge.py test`` (MergedClassifier) or ``fit`` (AdaMerging, one step) of the pool, on the
    pool's test sets but where ``data`` gives another."""
    paths = {task: data.get(task, pool.data[task]) for task in MERGE_TASKS}
    common = mf.merge_test_args(out, paths, pool.models[mf.PRETRAINED], 4)[1:]
    if command == "test":
        model = ["--model", "lightning_modules.merged.MergedClassifier"]
    else:
        model = ["--model", "AdaMerging", "--model.output_dir", str(out / "coefficients"), "--trainer.max_steps", "1",
                 "--data.adaptation_batch_size", "6"]  # fmt: skip
    pool_args = ["--model.models", json.dumps(pool.models), "--model.report_dir", str(out / "report")]
    return [command, *common, *model, *pool_args, *extra]


@pytest.mark.parametrize("command", ["test", "fit"])
@pytest.mark.parametrize("case", ["an empty file", "a JPEG cut short"])
def test_a_merge_image_that_cannot_be_read_is_one_error_line(case, command, pool, tmp_path, workdir, capsys):
    blob, reason = BROKEN[case]
    dtd = dtd_test_set(pool, tmp_path, 4, blob())
    line = one_error_line(merge_main, merge_run(pool, tmp_path, {"dtd": dtd}, command), capsys)
    assert line.startswith(f"error: task 'dtd', path '{dtd}', split 'test', row 4: {reason}"), line
    assert_nothing_written(tmp_path, workdir)


@pytest.mark.parametrize(("command", "workers"), [("test", 0), ("test", 2), ("fit", 2)])
def test_a_merge_image_broken_inside_is_one_error_line_mid_run(command, workers, pool, tmp_path, workdir, capsys):
    dtd = dtd_test_set(pool, tmp_path, 4, broken_inside_jpeg())
    line = one_error_line(merge_main, merge_run(pool, tmp_path, {"dtd": dtd}, command, f"--data.num_workers={workers}"), capsys)
    assert line == (f"error: task 'dtd', path '{dtd}', split 'test', row 4: "
                    "cannot read the image (OSError: broken data stream when reading image file)")  # fmt: skip
    assert_nothing_written(tmp_path, workdir)


# --- 5. labels that are no whole class number ----------------------------------------------------


def float_label_dataset(train_labels: list[float | None]) -> DatasetDict:
    images = {"train": good_images(len(train_labels)), "test": good_images(4)}
    labels = {"train": train_labels, "test": [0.0, 1.0, 2.0, 3.0]}
    return stored_dataset(images, "mnist", labels, label_type=Value("float32"))


@pytest.mark.parametrize("form", ["disk", "parquet"])
@pytest.mark.parametrize(("value", "shown"), [(2.6, "2.6"), (None, "missing")])
def test_a_float_label_that_is_no_class_number_is_one_error_line(value, shown, form, convnext, tmp_path, workdir, capsys):
    labels = [0.0, 1.0, value, 3.0, 4.0, 5.0, 6.0, 2.6 if value is None else 7.0]
    data = write_dataset(float_label_dataset(labels), tmp_path / "mnist", form)
    line = one_error_line(train_main, train_args(convnext, data, "mnist"), capsys)
    count = 2 if value is None else 1
    assert line == (f"error: task 'mnist', path '{data}', split 'train': label {shown} at row 2 is not a class number "
                    f"(a whole number 0-9 of 'mnist'); {count} such row(s)")  # fmt: skip
    assert not list(workdir.iterdir())


def test_whole_float_labels_are_class_numbers(convnext, tmp_path, workdir, capsys):
    """``2.0`` is class 2: pandas writes integer labels as floats next to a missing value, and
    nothing is ambiguous about it. The run trains and exports."""
    data = write_dataset(float_label_dataset([float(row) for row in range(8)]), tmp_path / "mnist", "parquet")
    train_main(train_args(convnext, data, "mnist", "--export_dir", str(tmp_path / "exports")))
    assert [path.name for path in (tmp_path / "exports").iterdir()], "exported"


def test_a_merge_test_split_with_a_float_label_is_one_error_line(pool, tmp_path, workdir, capsys):
    data = load_from_disk(pool.data["dtd"])["test"]
    labels = [float(label) for label in data["label"]]
    labels[1] = 0.5
    images = [image["bytes"] for image in data.cast_column("image", Image(decode=False))["image"]]
    stored_dataset({"test": images}, "dtd", {"test": labels}, Value("float64")).save_to_disk(str(tmp_path / "dtd"))
    line = one_error_line(merge_main, merge_run(pool, tmp_path, {"dtd": str(tmp_path / "dtd")}, "test"), capsys)
    assert line == (f"error: task 'dtd', path '{tmp_path / 'dtd'}', split 'test': label 0.5 at row 1 is not a class number "
                    "(a whole number 0-46 of 'dtd'); 1 such row(s)")  # fmt: skip
    assert_nothing_written(tmp_path, workdir)


# --- 6. a held-out fraction that holds out nothing, or everything -------------------------------


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        ("0.0001", "data.val_fraction 0.0001 holds out no row of the 12 training rows (round(12 x 0.0001) = 0): "
                   "it must be at least 0.08 to hold out one"),
        ("0.99", "data.val_fraction 0.99 holds out all 12 training rows, leaving none: it must be at most 0.9 to keep one"),
    ],
)  # fmt: skip
def test_a_val_fraction_that_holds_out_nothing_names_the_fraction(fraction, expected, convnext, tmp_path, workdir, capsys):
    data = write_dataset(stored_dataset({"train": good_images(12), "test": good_images(4)}, "mnist"), tmp_path / "mnist", "disk")
    args = train_args(convnext, data, "mnist", "--data.val_split=holdout", f"--data.val_fraction={fraction}")
    line = one_error_line(train_main, args, capsys)
    assert line == f"error: task 'mnist', path '{data}', split 'train': {expected}"
    assert not list(workdir.iterdir())


def test_a_merge_val_fraction_that_holds_out_nothing_names_the_fraction(pool, tmp_path, workdir, capsys):
    images = {"train": good_images(30), "test": good_images(4)}
    data = {task: write_dataset(stored_dataset(images, task), tmp_path / task, "disk") for task in MERGE_TASKS}
    dtd = data["dtd"]
    data["eurosat"] = write_dataset(
        stored_dataset({**images, "train": good_images(200)}, "eurosat"), tmp_path / "eurosat", "disk"
    )
    line = one_error_line(merge_main, merge_run(pool, tmp_path, data, "test", "--data.val_fraction", "0.01"), capsys)
    assert line == (f"error: task 'dtd', path '{dtd}', split 'train': data.val_fraction 0.01 holds out no row of the 30 "
                    "training rows (round(30 x 0.01) = 0): it must be at least 0.03 to hold out one")  # fmt: skip
    assert_nothing_written(tmp_path, workdir)


def test_the_fraction_named_holds_out_what_it_says():
    for rows in range(2, 3000):
        assert round(rows * float(_fraction_for(rows, 1))) == 1, rows
        assert round(rows * float(_fraction_for(rows, rows - 1))) == rows - 1, rows
