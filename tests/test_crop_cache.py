"""The crop cache (``--data.crop_cache``) and the evaluation's precision (``--model.tf32``,
``--model.compare_precision``, ``--trainer.precision``).

The cache feeds the model the very floats decoding does (bit for bit, on the real DTD, GTSRB and
MNIST samples and on tiny datasets made here), reads them back without decoding, keeps every
sample once over DDP ranks, is keyed by the images and every pixel-changing setting, rebuilds an
entry whose key or header differs and never reads a write that was interrupted. Bad input (an
unwritable cache directory, a disk without room, a full disk, a corrupt entry, a precision that
cannot do what it says) is one ``error:`` line, exit status 1 and nothing written
(``test_bad_input.py``'s helpers). Everything runs in-process.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

import datamodules.crop_cache as crop_cache
import merge_fixtures as mf
import test_bad_input
from conftest import index_dataset, write_dataset, write_preprocessor
from datamodules import MultiTaskDataModule
from datamodules.loaders import evaluation_dataloader
from datamodules.preprocessing import ImagePreprocessor
from datamodules.tasks import get_task
from merge import main as merge_main
from merging.saved import load_merged
from test_bad_input import one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")

# The empty working directory every test runs in (autouse), where leftovers show.
workdir = test_bad_input.workdir

NO_SPACE = os.strerror(errno.ENOSPC)
#: The pool's tasks: SUN397's 397 classes make near-tied logits, which bf16 flips.
TASKS = ("sun397", "dtd")
IMAGES = 160


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's bit patterns: equal bits, not merely equal values (-0.0, NaN)."""
    return tensor.contiguous().view(torch.int32)


def batches(data: MultiTaskDataModule) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    data.prepare_data()
    data.setup("test")
    return [list(loader) for loader in data.test_dataloader()]


def assert_same_inputs(expected, got) -> None:
    assert len(expected) == len(got)
    for loader_a, loader_b in zip(expected, got):
        assert len(loader_a) == len(loader_b)
        for (pixels_a, labels_a), (pixels_b, labels_b) in zip(loader_a, loader_b):
            assert pixels_a.dtype == pixels_b.dtype == torch.float32
            assert torch.equal(bits(pixels_a), bits(pixels_b)) and torch.equal(labels_a, labels_b)


def no_decoding(monkeypatch) -> None:
    """From here on, any resize or crop of a decoded image fails: a run that passes decoded none."""
    monkeypatch.setattr(ImagePreprocessor, "resize_and_crop", lambda self, image: pytest.fail("an image was decoded"))


# --- the same floats on the real samples ---------------------------------------------------------

#: Images per real sample: the 40 DTD JPEGs (300-640 px), 86 of the 430 GTSRB PPMs (35 px), 100 MNIST digits.
REAL_COUNTS = {"dtd": 40, "gtsrb": 86, "mnist": 100}


def real_samples(shared_dir: Path, root: Path) -> dict[str, str]:
    """``save_to_disk`` test splits of the real DTD JPEGs, GTSRB PPMs and MNIST digits (PNG, grayscale)."""
    data = shared_dir / "data"
    dtd = sorted((data / "dtd-10class-sample").glob("*/*.jpg"))
    gtsrb = [line.split(",") for line in (data / "gtsrb-test-430" / "labels.csv").read_text().splitlines()[1:] if line]
    gtsrb = gtsrb[:: len(gtsrb) // REAL_COUNTS["gtsrb"]][: REAL_COUNTS["gtsrb"]]  # spread over the classes
    raw = gzip.decompress((data / "mnist-t10k" / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((data / "mnist-t10k" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    digits = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[: REAL_COUNTS["mnist"]]
    digit_labels = np.frombuffer(labels, dtype=np.uint8, offset=8)[: len(digits)].astype(int).tolist()

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        PILImage.fromarray(array).save(buffer, format="PNG")  # the hub's MNIST holds PNGs
        return buffer.getvalue()

    rows = {
        "dtd": ([path.read_bytes() for path in dtd], [get_task("dtd").classnames.index(path.parent.name) for path in dtd]),
        "gtsrb": ([(data / "gtsrb-test-430" / name).read_bytes() for name, *_ in gtsrb], [int(row[1]) for row in gtsrb]),
        "mnist": ([png(digit) for digit in digits], digit_labels),
    }
    paths = {}
    for task, (images, task_labels) in rows.items():
        features = Features({"image": Image(), "label": ClassLabel(names=list(get_task(task).classnames))})
        stored = [{"bytes": image, "path": None} for image in images]
        DatasetDict({"test": Dataset.from_dict({"image": stored, "label": task_labels}, features=features)}).save_to_disk(
            str(root / task)
        )
        paths[task] = str(root / task)
    return paths


def test_the_cache_feeds_the_model_the_floats_decoding_does_on_the_real_samples(
    shared_dir, convnext_base_processor, tmp_path, capsys
):
    paths = real_samples(shared_dir, tmp_path / "data")
    options = dict(paths=paths, processor=convnext_base_processor, batch_size=64, num_workers=0)
    decoded = batches(MultiTaskDataModule(list(paths), **options))
    capsys.readouterr()
    written = batches(MultiTaskDataModule(list(paths), **options, crop_cache=str(tmp_path / "cache")))
    lines = capsys.readouterr().out.splitlines()
    # One line per split before it is written, with its size in bytes: 224 x 224 x 3 an image.
    for task, count in REAL_COUNTS.items():
        size = f"the {count:,} crops of task '{task}', split 'test' ({count * 150_528:,} bytes"
        assert any(size in line for line in lines), lines
    found = sorted((tmp_path / "cache").iterdir())
    assert [entry.name.rsplit("-", 1)[0] for entry in found] == ["dtd-test", "gtsrb-test", "mnist-test"]
    for entry, count in zip(found, REAL_COUNTS.values()):  # the crops and NumPy's header (64-4096 bytes)
        assert 0 < (entry / "crops.npy").stat().st_size - count * 150_528 <= 4096
    assert_same_inputs(decoded, written)  # the loaders of a run that writes the cache read from it


# --- keys, rebuilds and interrupted writes, on tiny datasets --------------------------------------


@pytest.fixture
def tiny(tmp_path, tiny_processor):
    """A made dataset of the eurosat task (train 30, test 13: grey squares whose value is the row)."""
    path = write_dataset(index_dataset({"train": 30, "test": 13}, get_task("eurosat").classnames), tmp_path / "eurosat", "disk")
    return SimpleNamespace(path=path, processor=tiny_processor, cache=tmp_path / "cache")


def tiny_data(tiny, processor: str | None = None, **options) -> MultiTaskDataModule:
    paths = {"eurosat": tiny.path}
    return MultiTaskDataModule(
        ["eurosat"], paths=paths, processor=processor or tiny.processor, batch_size=4, num_workers=0, **options
    )


def entries(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir()) if cache.exists() else []


def test_validation_and_test_splits_come_from_the_cache_bit_for_bit(tiny, monkeypatch):
    decoded = batches(tiny_data(tiny, val_fraction=0.2))
    written = batches(tiny_data(tiny, val_fraction=0.2, crop_cache=str(tiny.cache)))
    assert [name.rsplit("-", 1)[0] for name in entries(tiny.cache)] == ["eurosat-test", "eurosat-validation"]
    no_decoding(monkeypatch)
    read = batches(tiny_data(tiny, val_fraction=0.2, crop_cache=str(tiny.cache)))
    assert_same_inputs(decoded, written)
    assert_same_inputs(decoded, read)


def test_every_pixel_setting_and_every_image_is_part_of_the_key(tiny, tmp_path, monkeypatch):
    batches(tiny_data(tiny, crop_cache=str(tiny.cache)))
    first = entries(tiny.cache)
    settings = json.loads((Path(tiny.processor) / "preprocessor_config.json").read_text())
    changes = {
        "crop_pct": {**settings, "crop_pct": 0.875},
        "size": {**settings, "size": {"shortest_edge": 24}},
        "resample": {**settings, "resample": 2},
    }
    seen = set(first)
    for name, config in changes.items():
        processor = write_preprocessor(tmp_path / f"processor-{name}", config)
        batches(tiny_data(tiny, processor, crop_cache=str(tiny.cache)))
        new = set(entries(tiny.cache)) - seen
        assert len(new) == 1, name  # another key: another entry, the others untouched
        seen |= new
    # mean and std act after the crop: the same entry, and still the floats decoding gives
    normalised = write_preprocessor(tmp_path / "processor-std", {**settings, "image_std": [0.5, 0.5, 0.5]})
    read = batches(tiny_data(tiny, normalised, crop_cache=str(tiny.cache)))
    assert set(entries(tiny.cache)) == seen
    assert_same_inputs(batches(tiny_data(tiny, normalised)), read)
    # one pixel of one image, and Pillow's version
    changed = index_dataset({"train": 30, "test": 13}, get_task("eurosat").classnames)
    image = np.array(changed["test"][5]["image"])
    image[0, 0, 0] += 1
    rows = changed["test"].to_dict()
    rows["image"][5] = PILImage.fromarray(image)
    changed["test"] = Dataset.from_dict(rows, features=changed["test"].features)
    other = SimpleNamespace(path=write_dataset(changed, tmp_path / "changed", "disk"), processor=tiny.processor)
    batches(tiny_data(other, crop_cache=str(tiny.cache)))
    assert len(set(entries(tiny.cache)) - seen) == 1
    seen = set(entries(tiny.cache))
    monkeypatch.setattr(crop_cache.PIL, "__version__", "0.0.1")
    batches(tiny_data(tiny, crop_cache=str(tiny.cache)))
    assert len(set(entries(tiny.cache)) - seen) == 1


def test_an_entry_with_another_key_or_header_is_rebuilt_and_never_read(tiny, capsys):
    decoded = batches(tiny_data(tiny))
    batches(tiny_data(tiny, crop_cache=str(tiny.cache)))
    (entry,) = [tiny.cache / name for name in entries(tiny.cache)]
    # another key in key.json (what a copied or edited entry would hold), then crops that are not ours
    key = json.loads((entry / "key.json").read_text())
    (entry / "key.json").write_text(json.dumps({**key, "image_sha256": "0" * 64}))
    np.save(entry / "crops.npy", np.zeros(key["shape"], dtype=np.uint8))
    capsys.readouterr()
    assert_same_inputs(decoded, batches(tiny_data(tiny, crop_cache=str(tiny.cache))))
    out = capsys.readouterr().out
    assert f"crop cache: '{entry}' holds other crops (image_sha256 differ); rebuilding it" in out
    assert json.loads((entry / "key.json").read_text()) == key
    # the right key over an array of another shape
    np.save(entry / "crops.npy", np.zeros([key["shape"][0] - 1, *key["shape"][1:]], dtype=np.uint8))
    assert_same_inputs(decoded, batches(tiny_data(tiny, crop_cache=str(tiny.cache))))
    assert f"crop cache: '{entry}' holds other crops (shape differ); rebuilding it" in capsys.readouterr().out
    assert np.load(entry / "crops.npy").shape == tuple(key["shape"])


def test_an_interrupted_write_leaves_nothing_that_is_read(tiny, monkeypatch):
    decoded = batches(tiny_data(tiny))
    calls = 0
    real = ImagePreprocessor.to_uint8_array

    def interrupted(self, image):
        nonlocal calls
        calls += 1
        if calls == 7:  # the second batch: the first is in the file by then
            raise KeyboardInterrupt
        return real(self, image)

    monkeypatch.setattr(ImagePreprocessor, "to_uint8_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        batches(tiny_data(tiny, crop_cache=str(tiny.cache)))
    assert not tiny.cache.exists()  # no entry, no staging directory, not even the folder
    monkeypatch.setattr(ImagePreprocessor, "to_uint8_array", real)
    # A writer killed mid-write (its process gone) leaves its staging directory: never read, removed.
    batches(tiny_data(tiny, crop_cache=str(tiny.cache)))
    (key_entry,) = entries(tiny.cache)
    shutil.rmtree(tiny.cache / key_entry)
    dead = tiny.cache / f".{key_entry}.{2**22 + 12345}@{socket.gethostname()}.x1"
    dead.mkdir()
    np.save(dead / "crops.npy", np.zeros((13, 32, 32, 3), dtype=np.uint8))
    assert_same_inputs(decoded, batches(tiny_data(tiny, crop_cache=str(tiny.cache))))
    assert entries(tiny.cache) == [key_entry]


def test_every_rank_reads_its_share_and_every_sample_once(tiny):
    """What ``UnrepeatedDistributedSampler`` gives two DDP processes from the cache: every test
    sample once over both, with the floats a one-process decoding run gives it."""
    (decoded,) = batches(tiny_data(tiny))
    pixels = torch.cat([p for p, _ in decoded])
    data = tiny_data(tiny, crop_cache=str(tiny.cache))
    data.prepare_data()
    data.setup("test")
    dataset = data.test_datasets["eurosat"]
    seen = []
    for rank in (0, 1):
        trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        loader = evaluation_dataloader(dataset, 4, 0, trainer)
        indices = list(loader.sampler)
        for (batch, labels), start in zip(loader, range(0, len(indices), 4)):
            rows = indices[start : start + 4]
            assert torch.equal(bits(batch), bits(pixels[rows]))
            assert labels.tolist() == [row % 10 for row in rows]  # index_dataset's labels
            seen += rows
    assert sorted(seen) == list(range(13))


# --- merge.py test with the cache and with another precision ----------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("pool")
    models = mf.make_pool(root / "models", TASKS)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, IMAGES, models[task], seed=40 + i)) for i, task in enumerate(TASKS)
    }
    return SimpleNamespace(models=models, data=data)


@pytest.fixture(scope="module")
def pool_cache(pool, tmp_path_factory) -> Path:
    """A crop cache of the pool's test sets at its processor's settings, as ``merge.py test`` keys them."""
    cache = tmp_path_factory.mktemp("crop-cache")
    MultiTaskDataModule(list(TASKS), paths=pool.data, processor=pool.models[mf.PRETRAINED], crop_cache=str(cache)).prepare_data()
    return cache


MERGED = "lightning_modules.merged.MergedClassifier"
#: The method comparison of two methods and the individual models (``MethodComparison``).
COMPARISON = [
    "--model", "lightning_modules.comparison.MethodComparison",
    "--model.methods", json.dumps([{"class_path": "merging.SimpleAverage"},
                                   {"class_path": "merging.TaskArithmetic", "init_args": {"scaling_factor": 0.3}}]),
]  # fmt: skip


def merge_args(pool, out: Path, *extra: str, model: list[str] | None = None) -> list[str]:
    return [
        *mf.merge_test_args(out, pool.data, pool.models[mf.PRETRAINED], 16),
        *(model or ["--model", MERGED]),
        "--model.models", json.dumps(pool.models),
        "--model.report_dir", str(out / "report"),
        *extra,
    ]  # fmt: skip


def report(out: Path) -> dict:
    return json.loads((out / "report" / "report.json").read_text())


def test_the_comparison_reports_the_same_numbers_from_the_cache_without_decoding(pool, pool_cache, tmp_path, monkeypatch, capsys):
    merge_main(merge_args(pool, tmp_path / "plain", model=COMPARISON))
    plain = report(tmp_path / "plain")
    assert list(plain["rows"]) == ["simple_average", "task_arithmetic(scaling_factor=0.3)", "individual"]
    assert plain["precision"] == {"trainer": "32-true", "tf32": False}
    assert "Precision: 32-true (IEEE float32)." in (tmp_path / "plain" / "report" / "report.md").read_text()
    no_decoding(monkeypatch)
    capsys.readouterr()
    merge_main(merge_args(pool, tmp_path / "cached", "--data.crop_cache", str(pool_cache), model=COMPARISON))
    assert report(tmp_path / "cached") == plain  # every float of every row the same
    out = capsys.readouterr().out
    assert all(
        f"crop cache: reading the {IMAGES} crops of task '{task}', split 'test' from '{pool_cache}/" in out for task in TASKS
    )


def test_bf16_counts_the_test_predictions_that_change_against_fp32(pool, tmp_path):
    saved = tmp_path / "merged"
    args = ["--trainer.precision", "bf16-mixed", "--model.compare_precision", "true", "--model.save_dir", str(saved)]
    merge_main(merge_args(pool, tmp_path, *args))
    precision = report(tmp_path)["precision"]
    # The very weights in plain PyTorch: fp32 against bf16 autocast (what bf16-mixed runs on a CPU).
    merged = load_merged(str(saved)).backbone
    expected = {}
    for task in TASKS:
        model = mf.load_classifier(pool.models[task], merged)
        preprocess = ImagePreprocessor.from_pretrained(pool.models[task])
        images, _ = mf.read_test_set(pool.data[task])
        pixels = torch.stack([preprocess(image) for image in images])
        changed = 0
        with torch.no_grad():
            for start in range(0, len(pixels), 16):
                batch = pixels[start : start + 16]
                fp32 = model(pixel_values=batch).logits
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    bf16 = model(pixel_values=batch).logits
                changed += int((fp32.argmax(1) != bf16.argmax(1)).sum())
        expected[task] = changed
    assert precision == {
        "trainer": "bf16-mixed",
        "tf32": False,
        "reference": "32-true, TF32 off",
        "changed_predictions": {"simple_average": expected},
        "test_predictions": dict.fromkeys(TASKS, IMAGES),
    }
    assert sum(expected.values()) > 0  # the count is of something here
    text = (tmp_path / "report" / "report.md").read_text()
    per_task = ", ".join(f"{task} {expected[task]}/{IMAGES}" for task in TASKS)
    assert f"- simple_average: {sum(expected.values())} of {2 * IMAGES} ({per_task})" in text


def test_bf16_true_runs_on_a_cpu_and_says_what_it_did_not_measure(pool, tmp_path):
    merge_main(merge_args(pool, tmp_path, "--trainer.precision", "bf16-true"))
    precision = report(tmp_path)["precision"]
    assert precision["trainer"] == "bf16-true" and precision["changed_predictions"] is None
    line = "compare with a 32-true run"
    assert line in precision["not_measured"] and line in (tmp_path / "report" / "report.md").read_text()


# --- bad input: one error line, nothing written ---------------------------------------------------


def test_an_unwritable_cache_directory_is_one_error_line(pool, tmp_path, workdir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_error_line(merge_main, merge_args(pool, tmp_path, "--data.crop_cache", str(blocker / "cache")), capsys)
    assert line == f"error: data.crop_cache '{blocker / 'cache'}' cannot be written: '{blocker}' is not a directory"
    assert not (tmp_path / "report").exists() and not list(workdir.iterdir())


def test_a_disk_without_room_is_refused_before_writing(pool, tmp_path, workdir, monkeypatch, capsys):
    monkeypatch.setattr(crop_cache.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    cache = tmp_path / "cache"
    line = one_error_line(merge_main, merge_args(pool, tmp_path, "--data.crop_cache", str(cache)), capsys)
    needed = IMAGES * 32 * 32 * 3
    assert line == (
        f"error: data.crop_cache '{cache}': the {IMAGES} crops of task 'sun397', split 'test' need {needed:,} bytes "
        "and the disk has 1,000 free: free some space, point data.crop_cache elsewhere, or leave it unset"
    )
    assert not cache.exists() and not (tmp_path / "report").exists() and not list(workdir.iterdir())


def test_a_full_disk_while_writing_leaves_nothing(pool, tmp_path, workdir, monkeypatch, capsys):
    def no_space(descriptor):
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(crop_cache.os, "fsync", no_space)
    cache = tmp_path / "cache"
    line = one_error_line(merge_main, merge_args(pool, tmp_path, "--data.crop_cache", str(cache)), capsys)
    assert line.startswith(f"error: cannot write data.crop_cache '{cache}/sun397-test-"), line
    assert line.endswith(f"': {NO_SPACE}; nothing was written there")
    assert not cache.exists() and not (tmp_path / "report").exists() and not list(workdir.iterdir())


def test_a_corrupt_entry_is_one_error_line(pool, pool_cache, tmp_path, workdir, capsys):
    cache = shutil.copytree(pool_cache, tmp_path / "cache")
    entry = next(path for path in cache.iterdir() if path.name.startswith("dtd-"))
    crops = entry / "crops.npy"
    crops.write_bytes(crops.read_bytes()[:1000])  # cut short
    line = one_error_line(merge_main, merge_args(pool, tmp_path, "--data.crop_cache", str(cache)), capsys)
    assert line.startswith(f"error: data.crop_cache entry '{entry}' cannot be read (ValueError: "), line
    assert line.endswith("): delete it, and the next run rebuilds it")
    assert not (tmp_path / "report").exists() and not list(workdir.iterdir())


PRECISION_MISTAKES = {
    "tf32 on a CPU": (
        ["--model.tf32", "true"],
        "error: model.tf32 true needs a CUDA device (TF32 is a format of NVIDIA's tensor cores), and this run is on 'cpu', "
        "whose float32 is IEEE float32: leave model.tf32 false, or run on a GPU",
    ),
    "a comparison of fp32 with itself": (
        ["--model.compare_precision", "true"],
        "error: model.compare_precision true counts the predictions that change against an IEEE float32 pass, and this run "
        "is one (trainer.precision 32-true, model.tf32 false): set trainer.precision bf16-mixed (or model.tf32 true on a "
        "GPU), or leave model.compare_precision false",
    ),
    "a comparison without the fp32 weights": (
        ["--trainer.precision", "bf16-true", "--model.compare_precision", "true"],
        "error: model.compare_precision true needs the float32 weights and images in the test step, and trainer.precision "
        "bf16-true converts both before it: evaluate with a mixed precision (bf16-mixed: float32 weights, bf16 autocast), "
        "or run 32-true separately",
    ),
    "an unknown precision": (["--trainer.precision", "bf17"], "error: trainer.precision"),
}


@pytest.mark.parametrize("case", PRECISION_MISTAKES)
def test_a_precision_setting_that_cannot_work_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    mistake, expected = PRECISION_MISTAKES[case]
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *mistake), capsys)
    assert line.startswith(expected), line
    assert not (tmp_path / "report").exists() and not (tmp_path / "root").exists() and not list(workdir.iterdir())
