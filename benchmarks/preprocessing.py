"""Preprocessing speed: ImagePreprocessor against each family's Hugging Face image processor.

    HF_HUB_OFFLINE=1 python -m benchmarks.preprocessing [--seconds 3] [--rows 400] [--families convnext vit]

For each family's processor settings (``FAMILIES``: ConvNeXt's, which ResNet-50 and the 224-px
ConvNeXt-V2 checkpoints share, ViT's, Swin's and DINOv2's), it prints images/s of one process
with one thread (what one DataLoader worker gets) on decoded images in memory, the real DTD
JPEGs in ``../shared/data/dtd-10class-sample`` (sizes 300-640 px) and the GTSRB PPMs (35 px),
with the largest absolute difference between the two outputs; then, with ConvNeXt's settings,
end to end from the JPEG bytes, and the images/s of the test DataLoader of
``ImageClassificationDataModule`` with 0 and 2 workers on a local ``save_to_disk`` dataset of
those JPEGs. It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from datamodules import ImageClassificationDataModule, ImagePreprocessor
from datamodules.preprocessing import BIT, VIT
from datamodules.tasks import TASKS

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SAMPLE_DIR = DATA_DIR / "dtd-10class-sample"
GTSRB_DIR = DATA_DIR / "gtsrb-test-430"

#: Each family's processor settings, as the hub checkpoints named hold them.
FAMILIES = {
    # facebook/convnext-base-224, microsoft/resnet-50, facebook/convnextv2-*-224
    "convnext": ImagePreprocessor(),
    # google/vit-base-patch16-224
    "vit": ImagePreprocessor(size=(224, 224), crop_pct=None, resample=2, mean=(0.5,) * 3, std=(0.5,) * 3, processor_type=VIT),
    # microsoft/swin-tiny-patch4-window7-224
    "swin": ImagePreprocessor(size=(224, 224), crop_pct=None, resample=3, processor_type=VIT),
    # facebook/dinov2-base
    "dinov2": ImagePreprocessor(size=256, crop_pct=None, crop_size=(224, 224), convert_rgb=True, processor_type=BIT),
}


def rates(functions: dict[str, Callable], inputs: list, seconds: float) -> dict[str, float]:
    """Images/s of each function: the best pass over ``inputs``, passes interleaved so that a
    busy machine slows every function alike; after one warm-up pass each, ``seconds`` in all."""
    for function in functions.values():
        for item in inputs:
            function(item)
    best = dict.fromkeys(functions, 0.0)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, function in functions.items():
            start = time.perf_counter()
            for item in inputs:
                function(item)
            best[name] = max(best[name], len(inputs) / (time.perf_counter() - start))
    return best


def compare(name: str, ours: Callable, theirs: Callable, inputs: list, seconds: float) -> None:
    rate = rates({"ours": ours, "theirs": theirs}, inputs, seconds)
    difference = max(float((ours(item) - theirs(item)).abs().max()) for item in inputs)
    print(
        f"{name:<32} ImagePreprocessor {rate['ours']:7.1f} img/s | HF processor {rate['theirs']:7.1f} img/s | "
        f"speed-up {rate['ours'] / rate['theirs']:4.2f}x | max abs diff {difference:.2e}"
    )


def write_dataset(files: list[Path], rows: int, root: Path) -> str:
    """A ``save_to_disk`` DatasetDict whose test split repeats the JPEG bytes to ``rows`` rows."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    classnames = list(TASKS["dtd"].classnames)
    images = [{"bytes": files[i % len(files)].read_bytes(), "path": None} for i in range(rows)]
    labels = [classnames.index(files[i % len(files)].parent.name) for i in range(rows)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=classnames)})
    split = Dataset.from_dict({"image": images, "label": labels}, features=features)
    DatasetDict({"train": split, "test": split}).save_to_disk(str(root))
    return str(root)


def loader_rate(path: str, processor: str, workers: int, batch_size: int) -> float:
    """Images/s of the test DataLoader over its second pass (workers already started)."""
    data = ImageClassificationDataModule("dtd", path=path, processor=processor, batch_size=batch_size, num_workers=workers)
    data.setup("test")
    loader = data.test_dataloader()
    for _ in loader:  # first pass: starts the workers and warms the caches
        pass
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - start)


def decoded(files: list[Path]) -> list[Image.Image]:
    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="time per comparison")
    parser.add_argument("--rows", type=int, default=400, help="rows of the DataLoader benchmark's dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args()

    files = sorted(SAMPLE_DIR.glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"error: no JPEGs under {SAMPLE_DIR} (the benchmark needs ../shared/data)")
    from transformers import AutoImageProcessor

    torch.set_num_threads(1)  # one DataLoader worker's share
    samples = {"DTD JPEGs": decoded(files), "GTSRB PPMs": decoded(sorted(GTSRB_DIR.glob("*.ppm")))}
    for name, images in samples.items():
        sizes = sorted({image.size for image in images})
        print(f"{len(images)} {name}, {sizes[0]} to {sizes[-1]} px; torch threads 1")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            processor_dir = Path(tmp) / family
            FAMILIES[family].to_processor().save_pretrained(processor_dir)
            ours = ImagePreprocessor.from_pretrained(str(processor_dir))
            theirs = AutoImageProcessor.from_pretrained(str(processor_dir))

            def hf(image: Image.Image, theirs=theirs) -> torch.Tensor:
                return theirs(images=image, return_tensors="pt")["pixel_values"][0]

            print(f"{family}: {type(theirs).__name__}")
            for name, images in samples.items():
                compare(f"  {name}, decoded", ours, hf, images, args.seconds)
            if family != "convnext":
                continue
            encoded = [file.read_bytes() for file in files]
            compare(
                "  DTD end to end, JPEG bytes",
                lambda data, ours=ours: ours(Image.open(io.BytesIO(data))),
                lambda data, hf=hf: hf(Image.open(io.BytesIO(data))),
                encoded,
                args.seconds,
            )
            path = write_dataset(files, args.rows, Path(tmp) / "dataset")
            for workers in (0, 2):
                rate = loader_rate(path, str(processor_dir), workers, args.batch_size)
                print(f"  DataLoader, {workers} worker(s), batch {args.batch_size}, {args.rows} JPEGs: {rate:7.1f} img/s")


if __name__ == "__main__":
    main()
