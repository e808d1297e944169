"""The evaluation's data path at full size: images/s per DataLoader worker, and what a cache of
preprocessed uint8 crops would give.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.eval_data_path [--workers 0,1,2] [--batch-size 64]
        [--dtd-rows 400] [--cache /tmp/convnext-fusion-eval]

Sources, all real images at facebook/convnext-base-224's processor settings (shorter side to 256,
bicubic, centre-crop 224, ImageNet mean/std): the 40 DTD JPEGs of ``../shared/data`` repeated to
``--dtd-rows`` rows (300-640 px, like the larger benchmark images: SUN397, Stanford Cars, RESISC45),
the 430 GTSRB test images (35x35 PPM, upscaled) and the 10,000 MNIST test digits (28x28 PNG,
grayscale), the last two from ``benchmarks/eval_throughput.py``'s cache.

For each source and worker count: images/s of the evaluation DataLoader exactly as ``merge.py``
builds it (``MultiTaskDataModule.test_dataloader()``: decode + resize + crop + normalise), over its
second pass (workers started, page cache warm), and that rate per worker (0 workers: the main
process alone). Then a cache prototype, here in the benchmark and not in the product: the split's
uint8 crops written once into one ``.npy`` file (the build's time printed), read back through a
``DataLoader`` that memory-maps it and normalises each batch; its images/s per worker beside the
decoding path's. The main process runs one torch thread, as a DataLoader worker does. It measures
and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from torch.utils.data import DataLoader, Dataset

from benchmarks.eval_throughput import DEFAULT_CACHE, write_datasets
from benchmarks.preprocessing import SAMPLE_DIR, write_dataset
from datamodules import ImagePreprocessor, MultiTaskDataModule


class CachedCrops(Dataset):
    """Prototype of a crop cache: uint8 crops in one ``.npy`` file, each batch normalised on read.

    Args:
        path: the ``.npy`` file of ``(N, 3, size, size)`` uint8 crops.
        preprocess: whose ``normalize`` turns a batch of crops into model inputs.
        labels: one label per crop.
    """

    def __init__(self, path: Path, preprocess: ImagePreprocessor, labels: list[int]) -> None:
        self.path, self.preprocess, self.labels = path, preprocess, labels
        self.crops: np.ndarray | None = None  # mapped in the process that reads (each worker)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        if self.crops is None:
            self.crops = np.load(self.path, mmap_mode="r")
        pixels = self.preprocess.normalize(torch.from_numpy(self.crops[indices]))
        return [(pixels[i], self.labels[index]) for i, index in enumerate(indices)]


def rate(loader: DataLoader) -> float:
    """Images/s over the loader's second pass (the first starts the workers and warms the caches)."""
    for _ in loader:
        pass
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - start)


def evaluation_loader(task: str, path: str, processor: str, workers: int, batch_size: int) -> DataLoader:
    data = MultiTaskDataModule([task], paths={task: path}, processor=processor, batch_size=batch_size, num_workers=workers)
    return data.test_dataloader()[0]


def build_cache(path: str, processor: str, target: Path) -> tuple[float, list[int]]:
    """Write the test split's uint8 crops into ``target``; returns the seconds it took and the labels."""
    split = load_from_disk(path)["test"]
    preprocess = ImagePreprocessor.from_pretrained(processor)
    start = time.perf_counter()
    crops = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(split), 3, preprocess.size, preprocess.size))
    for row, example in enumerate(split):
        crops[row] = preprocess.to_uint8_tensor(example["image"]).numpy()
    crops.flush()
    return time.perf_counter() - start, split.with_format("numpy")[:]["label"].tolist()


def measure_source(name: str, task: str, path: str, processor: str, args: argparse.Namespace, scratch: Path) -> None:
    target = scratch / f"{task}.npy"
    seconds, labels = build_cache(path, processor, target)
    size_mb = target.stat().st_size / 1e6
    print(
        f"{name}: {len(labels)} images; cache build {seconds:.1f} s ({len(labels) / seconds:.0f} img/s, one process), {size_mb:.0f} MB"
    )
    cached = CachedCrops(target, ImagePreprocessor.from_pretrained(processor), labels)
    for workers in args.workers:
        decoded = rate(evaluation_loader(task, path, processor, workers, args.batch_size))
        from_cache = rate(DataLoader(cached, batch_size=args.batch_size, num_workers=workers, persistent_workers=workers > 0))
        per = max(workers, 1)
        print(f"  {workers} workers: decode path {decoded:7.0f} img/s ({decoded / per:5.0f} per worker) | "
              f"cached crops {from_cache:7.0f} img/s ({from_cache / per:5.0f} per worker), {from_cache / decoded:.1f}x", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=lambda text: [int(w) for w in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtd-rows", type=int, default=400)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="benchmarks/eval_throughput.py's, for MNIST and GTSRB")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's share
    write_datasets(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        processor = str(scratch / "processor")
        ImagePreprocessor().to_processor().save_pretrained(processor)  # convnext-base-224's settings
        dtd = write_dataset(sorted(SAMPLE_DIR.glob("*/*.jpg")), args.dtd_rows, scratch / "dtd")
        sources = [("dtd (JPEG 300-640 px)", "dtd", dtd), ("gtsrb (35 px PPM)", "gtsrb", str(args.cache / "data" / "gtsrb")),
                   ("mnist (28 px PNG, gray)", "mnist", str(args.cache / "data" / "mnist"))]  # fmt: skip
        for name, task, path in sources:
            measure_source(name, task, path, processor, args, scratch)


if __name__ == "__main__":
    main()
