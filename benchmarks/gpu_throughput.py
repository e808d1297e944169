"""GPU figures: convnext-base-224 training images/s (fp32 / bf16-mixed, channels-last off / on),
its evaluation forward's images/s (``--parts eval``: no gradients, eval mode, fp32 / TF32 / bf16
autocast), the data pipeline's images/s with N workers, and the estimated time of a 4,000-step
fine-tune.

    python -m benchmarks.gpu_throughput --jpegs ../shared/data/dtd-10class-sample --workers 8 16 [--parts train,eval,data]

Random weights and synthetic batches for the model (no hub access needed); the data
pipeline reads real JPEGs (the DTD sample, repeated) through ImageClassificationDataModule.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset
from transformers import ConvNextConfig

from benchmarks.recipe import sgd_settings
from datamodules import ImageClassificationDataModule, ImagePreprocessor, get_task
from lightning_modules.classifier import ImageClassifier

BASE = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024])


class _StepClock(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        torch.cuda.synchronize()
        self.end = time.perf_counter()


def model_images_per_second(model_dir: Path, precision: str, channels_last: bool, steps: int, warmup: int) -> float:
    images = torch.randn(256, 3, 224, 224)
    labels = torch.randint(0, 47, (256,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True, drop_last=True, pin_memory=True)
    model = ImageClassifier(
        47, model_name_or_path=str(model_dir), pretrained=False, channels_last=channels_last, **sgd_settings()
    )
    clock = _StepClock(warmup)
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=loader)
    return steps * 64 / (clock.end - clock.start)


def eval_images_per_second(mode: str, batch_size: int, batches: int) -> float:
    """The evaluation forward alone: ``inference_mode``, eval mode, one resident batch, mean of ``batches`` after 3 warm-ups."""
    from transformers import ConvNextForImageClassification

    model = ConvNextForImageClassification(BASE).eval().cuda()  # random weights: the cost is the same
    images = torch.randn(batch_size, 3, 224, 224, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16")
    with torch.inference_mode(), autocast:
        for _ in range(3):
            model(pixel_values=images)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(pixel_values=images).logits.argmax(-1)
        torch.cuda.synchronize()
    torch.backends.cuda.matmul.allow_tf32 = False
    return batches * batch_size / (time.perf_counter() - start)


def pipeline_images_per_second(dataset_dir: Path, processor_dir: Path, workers: int, batches: int) -> float:
    data = ImageClassificationDataModule(
        "dtd", path=str(dataset_dir), processor=str(processor_dir), batch_size=64, num_workers=workers
    )
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    for _ in range(max(2, workers // 4)):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * 64 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jpegs", type=Path, required=True, help="folder of <class>/<image>.jpg (DTD sample)")
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--parts", default="train,eval,data", help="comma-separated: train, eval, data")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="the merge configs' batch size")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(torch.cuda.get_device_name(0), torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        BASE.save_pretrained(root / "model")
        ImagePreprocessor().to_processor().save_pretrained(root / "model")
        best = 0.0
        for precision in ("32-true", "bf16-mixed") if "train" in parts else ():
            for channels_last in (False, True):
                rate = model_images_per_second(root / "model", precision, channels_last, args.steps, args.warmup)
                best = max(best, rate)
                print(f"model  precision={precision:10s} channels_last={channels_last!s:5s} {rate:7.0f} images/s", flush=True)
        for mode in ("fp32", "tf32", "bf16") if "eval" in parts else ():
            rate = eval_images_per_second(mode, args.eval_batch_size, batches=20)
            print(f"eval   {mode} forward, batch {args.eval_batch_size}: {rate:7.0f} images/s", flush=True)
        if "data" not in parts:
            return
        names = list(get_task("dtd").classnames)
        files = sorted(args.jpegs.glob("*/*.jpg"))
        rows = {"image": [str(f) for f in files] * 100, "label": [names.index(f.parent.name) for f in files] * 100}
        features = Features({"image": Image(), "label": ClassLabel(names=names)})
        split = Dataset.from_dict(rows, features=features)
        DatasetDict({"train": split, "test": split}).save_to_disk(root / "data")
        pipeline = 0.0
        for workers in args.workers:
            rate = pipeline_images_per_second(root / "data", root / "model", workers, batches=40)
            pipeline = max(pipeline, rate)
            print(
                f"data   workers={workers:3d} {rate:7.0f} images/s (decode + resize + crop + normalise, real JPEGs)", flush=True
            )
        if best == 0.0:
            return
        limit = min(best, pipeline)
        print(f"4,000 steps x 64 images at {limit:.0f} images/s: {4000 * 64 / limit / 60:.1f} min (model and data bound)")


if __name__ == "__main__":
    main()
