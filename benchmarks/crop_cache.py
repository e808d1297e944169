"""The evaluation with and without the crop cache (``--data.crop_cache``) on CPU, and the disk it takes.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.crop_cache [--repeats 3] [--workers 0,2]
        [--batch-size 128] [--mnist-rows 2000] [--dtd-rows 200] [--threads 1] [--cache /tmp/convnext-fusion-crops]

Data (written once into ``--cache``): the first ``--mnist-rows`` of benchmarks/eval_throughput.py's
MNIST test set (28x28 PNGs) with the 430 GTSRB PPMs (35 px), and the 40 real DTD JPEGs of
``../shared/data`` (300-640 px, like SUN397, Stanford Cars or RESISC45) repeated to ``--dtd-rows``
rows; facebook/convnext-base-224's
preprocessing (shorter side 256, bicubic, centre crop 224). Model: a tiny ConvNeXt pool
(``depths=[1,1,1,1]``, ``hidden_sizes=[8,16,32,64]``, random weights; the pretrained model and one
fine-tuned model per task), merged by simple average: on a CPU a base-sized model's forward (about 4
images/s, ``benchmarks/README.md``) would hide the data path entirely, and the tiny one shows what the
data path can feed.

For each source (``mnist+gtsrb``, ``dtd``) and worker count, ``merge.py test`` runs in a fresh
process without and with the cache (built once first, its build time and file sizes printed), the
sides interleaved ``--repeats`` times (every other round in reverse order); printed: images/s of
the test loop (``eval_throughput.TestLoopTimer``) and of the whole process, best and median, the
load averages, and the accuracies, which must be the same on both sides. Then the data path alone
(``--parts loaders``): images/s of the same evaluation loaders over their second pass, without the
model, both sides interleaved in this process. ``--threads 1`` is the measurement to make on a
shared machine: there torch's two intra-op threads in the main process fight the other jobs (128
crops normalised in 5.1 s with two threads, 0.46 s with one, at a load of 8), as a DataLoader
worker's single thread does not. Then the time to hash each
split's stored bytes (the cache's key, once per run) and the disk the cache takes for the eight,
fourteen and twenty tasks' test splits at 224 px. It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.eval_throughput import REPO, TINY, load_average, run_timed, write_datasets, write_pool
from benchmarks.preprocessing import SAMPLE_DIR, write_dataset

DEFAULT_CACHE = Path("/tmp/convnext-fusion-crops")
SOURCES = {"mnist+gtsrb": ("mnist", "gtsrb"), "dtd": ("dtd",)}
#: Bytes of one 224 x 224 RGB crop.
CROP_BYTES = 224 * 224 * 3

#: Test-split sizes (the split each task's registry entry evaluates: food101's ``validation``), as the
#: datasets' cards and the TALL14/TALL20 papers give them; not read from the hub, which is out of reach
#: here (``../shared/classnames/README.md`` has no sizes).
TEST_IMAGES = {
    "sun397": 19_850, "stanford_cars": 8_041, "resisc45": 6_300, "eurosat": 2_700, "svhn": 26_032,
    "gtsrb": 12_630, "mnist": 10_000, "dtd": 1_880,
    "oxford_flowers102": 6_149, "pcam": 32_768, "fer2013": 3_589, "oxford_iiit_pet": 3_669, "stl10": 8_000,
    "cifar100": 10_000,
    "cifar10": 10_000, "food101": 25_250, "fashion_mnist": 10_000, "emnist_letters": 20_800, "kmnist": 10_000,
    "rendered_sst2": 1_821,
}  # fmt: skip


def data_paths(cache: Path, args: argparse.Namespace) -> dict[str, Path]:
    return {
        "mnist": cache / "data" / f"mnist-{args.mnist_rows}",
        "gtsrb": cache / "data" / "gtsrb",
        "dtd": cache / "data" / f"dtd-{args.dtd_rows}",
    }


def prepare(cache: Path, args: argparse.Namespace) -> None:
    """Datasets, pool (``_pretrained_``, mnist, gtsrb, dtd), processor and configs, unless there."""
    from datasets import DatasetDict, load_from_disk

    from datamodules import ImagePreprocessor

    cache.mkdir(parents=True, exist_ok=True)
    write_datasets(cache)
    paths = data_paths(cache, args)
    if not (paths["mnist"] / "dataset_dict.json").is_file():
        mnist = load_from_disk(str(cache / "data" / "mnist"))["test"]
        DatasetDict({"test": mnist.select(range(args.mnist_rows))}).save_to_disk(str(paths["mnist"]))
    if not (paths["dtd"] / "dataset_dict.json").is_file():
        write_dataset(sorted(SAMPLE_DIR.glob("*/*.jpg")), args.dtd_rows, paths["dtd"])
    tasks = ("mnist", "gtsrb", "dtd")
    if not (cache / "pool" / "dtd" / "preprocessor_config.json").is_file():
        write_pool(cache, TINY, tasks)
        for directory in ("_pretrained_", *tasks):  # a pool checkpoint carries its processor
            ImagePreprocessor().to_processor().save_pretrained(cache / "pool" / directory)  # convnext-base-224's settings
    for source, source_tasks in SOURCES.items():
        config = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "default_root_dir": str(cache / "runs" / source)},
            "model": {"class_path": "lightning_modules.merged.MergedClassifier",
                      "init_args": {"models": {name: str(cache / "pool" / name) for name in ("_pretrained_", *source_tasks)},
                                    "method": {"class_path": "merging.SimpleAverage"},
                                    "report_dir": str(cache / "runs" / source)}},
            "data": {"tasks": list(source_tasks), "paths": {task: str(paths[task]) for task in source_tasks},
                     "processor": str(cache / "pool" / "_pretrained_")},
        }  # fmt: skip
        (cache / f"{source}.json").write_text(json.dumps(config))  # JSON is YAML


def run_merge(cache: Path, source: str, workers: int, batch_size: int, crop_cache: Path | None) -> dict:
    """One ``merge.py test`` in a fresh process: its wall time, its test loop's, its accuracies."""
    with tempfile.TemporaryDirectory() as scratch:
        timer = {"class_path": "benchmarks.eval_throughput.TestLoopTimer", "init_args": {"path": f"{scratch}/loop.json"}}
        command = [sys.executable, "merge.py", "test", "--config", str(cache / f"{source}.json"),
                   f"--data.batch_size={batch_size}", f"--data.num_workers={workers}",
                   f"--trainer.callbacks+={json.dumps(timer)}"]  # fmt: skip
        if crop_cache is not None:
            command.append(f"--data.crop_cache={crop_cache}")
        seconds, _ = run_timed(command)
        loop = json.loads(Path(scratch, "loop.json").read_text())
    report = json.loads((cache / "runs" / source / "report.json").read_text())
    tasks = next(iter(report["rows"].values()))["tasks"]
    return {
        "process_seconds": seconds,
        "loop_seconds": loop["end"] - loop["start"],
        "images": sum(values["num_samples"] for values in tasks.values()),
        "accuracy": {task: values["accuracy"] for task, values in tasks.items()},
    }


def build(cache: Path, crops: Path, batch_size: int, workers: int) -> None:
    """The cache's entries of every source, written by one ``merge.py test`` each; their build and sizes."""
    shutil.rmtree(crops, ignore_errors=True)
    for source in SOURCES:
        run = run_merge(cache, source, workers, batch_size, crops)
        print(
            f"{source}: cache written by merge.py test in {run['process_seconds']:.1f} s ({workers} workers), load {load_average()}"
        )
    for entry in sorted(crops.iterdir()):
        size = (entry / "crops.npy").stat().st_size
        images = json.loads((entry / "key.json").read_text())["images"]
        print(f"  {entry.name}: {images:,} crops, crops.npy {size:,} bytes ({size - images * CROP_BYTES} bytes of header)")


def measure(args: argparse.Namespace, crops: Path) -> None:
    print(
        f"load averages at the start: {load_average()}; OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True
    )
    for source in SOURCES:
        for workers in args.workers:
            runs: dict[str, list[dict]] = {"decoding": [], "crop cache": []}
            sides = {"decoding": None, "crop cache": crops}
            for repeat in range(args.repeats):
                for side in list(sides)[:: -1 if repeat % 2 else 1]:
                    runs[side].append(run_merge(args.cache, source, workers, args.batch_size, sides[side]))
                    last = runs[side][-1]
                    print(f"[{source}, {workers} workers, {repeat + 1}/{args.repeats}] {side:10s} process {last['process_seconds']:6.2f} s"
                          f"  loop {last['loop_seconds']:6.2f} s  load {load_average()}", flush=True)  # fmt: skip
            summarize(source, workers, runs)
    print(f"load averages at the end: {load_average()}")


def summarize(source: str, workers: int, runs: dict[str, list[dict]]) -> None:
    images = runs["decoding"][0]["images"]
    for side, side_runs in runs.items():
        loop = [images / run["loop_seconds"] for run in side_runs]
        process = [images / run["process_seconds"] for run in side_runs]
        accuracy = ", ".join(f"{task} {value:.4f}" for task, value in side_runs[0]["accuracy"].items())
        print(f"{source} ({images:,} images), {workers} workers, {side:10s}: loop {max(loop):7.0f} / {statistics.median(loop):<7.0f}"
              f" images/s, process {max(process):5.0f} / {statistics.median(process):<5.0f} (best / median); {accuracy}")  # fmt: skip
    best = min(run["loop_seconds"] for run in runs["decoding"]) / min(run["loop_seconds"] for run in runs["crop cache"])
    median = statistics.median(run["loop_seconds"] for run in runs["decoding"]) / statistics.median(
        run["loop_seconds"] for run in runs["crop cache"]
    )
    print(f"  test loop with the cache: {best:.2f}x (best), {median:.2f}x (median)")


def loaders(args: argparse.Namespace, crops: Path) -> None:
    """The data path alone: images/s of ``merge.py``'s evaluation loaders (``MultiTaskDataModule``)
    with and without the cache, over each loader's second pass, in this process, interleaved."""
    import torch

    from benchmarks.eval_data_path import rate
    from datamodules import MultiTaskDataModule

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = data_paths(args.cache, args)
    processor = str(args.cache / "pool" / "_pretrained_")
    for source, tasks in SOURCES.items():
        for workers in args.workers:
            rates: dict[str, list[float]] = {"decoding": [], "crop cache": []}
            for repeat in range(args.repeats):
                for side in list(rates)[:: -1 if repeat % 2 else 1]:
                    options = {"crop_cache": str(crops)} if side == "crop cache" else {}
                    data = MultiTaskDataModule(list(tasks), paths={task: str(paths[task]) for task in tasks}, processor=processor,
                                               batch_size=args.batch_size, num_workers=workers, **options)  # fmt: skip
                    data.prepare_data()
                    data.setup("test")
                    images = sum(len(loader.dataset) for loader in data.test_dataloader())
                    seconds = sum(len(loader.dataset) / rate(loader) for loader in data.test_dataloader())
                    rates[side].append(images / seconds)
            line = ", ".join(f"{side} {max(r):6.0f} / {statistics.median(r):<6.0f}" for side, r in rates.items())
            print(f"loaders only, {source}, {workers} workers: {line} images/s (best / median); "
                  f"{max(rates['crop cache']) / max(rates['decoding']):.1f}x (best); load {load_average()}", flush=True)  # fmt: skip


def hashing(cache: Path, args: argparse.Namespace) -> None:
    """Seconds to hash each split's stored image bytes (``image_digest``), the key's one cost per run."""
    from datasets import load_from_disk

    from datamodules.images import image_digest

    for task, path in data_paths(cache, args).items():
        split = load_from_disk(str(path))["test"]
        start = time.perf_counter()
        image_digest(split, range(len(split)))
        seconds = time.perf_counter() - start
        stored = split.data.nbytes
        print(f"hash of {task}'s {len(split):,} stored images ({stored / 1e6:.1f} MB of Arrow): {seconds:.3f} s "
              f"({stored / 1e6 / seconds:.0f} MB/s)")  # fmt: skip


def disk() -> None:
    """The cache's size for the benchmarks' test splits at 224 px (a header of at most 4 KiB per file aside)."""
    from datamodules.tasks import BENCHMARKS

    for name in ("ta8", "tall14", "tall20"):
        images = sum(TEST_IMAGES[task] for task in BENCHMARKS[name])
        print(f"{name}: {len(BENCHMARKS[name])} test splits, {images:,} images x {CROP_BYTES:,} bytes = {images * CROP_BYTES / 1e9:.2f} GB "
              f"({images * CROP_BYTES / 2**30:.2f} GiB)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the datasets, pool, configs and crops go")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=lambda text: [int(w) for w in text.split(",")], default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mnist-rows", type=int, default=2000)
    parser.add_argument("--dtd-rows", type=int, default=200)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every measured process (default: torch's, one per core)")
    parser.add_argument("--disk-only", action="store_true", help="print the disk figures only")
    parser.add_argument("--parts", type=lambda text: text.split(","), default=["merge", "loaders"],
                        help="merge (merge.py test processes), loaders (the evaluation loaders alone)")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every measured process
    disk()
    if args.disk_only:
        return
    prepare(args.cache, args)
    hashing(args.cache, args)
    crops = args.cache / "crops"
    build(args.cache, crops, args.batch_size, max(args.workers))
    if "merge" in args.parts:
        measure(args, crops)
    if "loaders" in args.parts:
        loaders(args, crops)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
