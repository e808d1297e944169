"""Training speed: ``train.py fit`` against a bare PyTorch loop doing the same work.

    HF_HUB_OFFLINE=1 python -m benchmarks.train_throughput [--steps 120] [--warmup 10] [--repeats 2]

Both sides fine-tune the tiny ConvNeXt of ``configs/quickstart/convnext-tiny-32`` (random
init) on the built-in ``digits`` task, global batch 64, fp32, on the CPU with the process's
torch threads, ``num_workers`` 0. The Lightning side is the real CLI
(``configs/quickstart/digits.yaml`` with logger, checkpointing, validation and export off,
progress bar on as a user sees it); the bare side is the same model class, the same
DataLoader (same sampler, same preprocessing, same batches) and ``forward / cross_entropy /
zero_grad / backward / SGD.step``. Each side is timed from the start of step ``warmup`` to
the end of the last step, so start-up is excluded; the sides alternate ``repeats`` times and
the best rate of each counts, so a busy machine slows both alike. It prints; it asserts nothing.
The "no progress bar" row isolates the training loop and the module's own logging; "preloaded"
shows what the data loading costs both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.nn import functional as F

# `--trainer.callbacks=[{class_path: benchmarks.train_throughput.StepTimer` imports this module by name: under
# `python -m` make that name this very module, so the timer writes where main() reads.
sys.modules.setdefault("benchmarks.train_throughput", sys.modules[__name__])

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "quickstart" / "convnext-tiny-32"
BATCH_SIZE = 64
TIMES: dict[str, float] = {}


class StepTimer(Callback):
    """Wall time from the start of step ``warmup`` to the end of the last training step.

    Args:
        warmup: steps left out of the timing (start-up, first allocations).
    """

    def __init__(self, warmup: int = 10) -> None:
        self.warmup = warmup

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            TIMES["start"] = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        TIMES["end"] = time.perf_counter()


def lightning_rate(steps: int, warmup: int, progress_bar: bool) -> float:
    from train import main

    TIMES.clear()
    timer = {"class_path": "benchmarks.train_throughput.StepTimer", "init_args": {"warmup": warmup}}
    with tempfile.TemporaryDirectory() as run_dir:  # the run's config.yaml, away from a real quickstart
        main(
            [
                "fit", "--config", str(REPO / "configs" / "quickstart" / "digits.yaml"),
                f"--model.model_name_or_path={TINY}", "--model.pretrained=false", f"--data.processor={TINY}",
                f"--data.batch_size={BATCH_SIZE}", "--data.num_workers=0",
                f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
                "--trainer.enable_checkpointing=false", f"--trainer.callbacks=[{json.dumps(timer)}]",
                f"--trainer.enable_progress_bar={str(progress_bar).lower()}", "--trainer.enable_model_summary=false",
                f"--trainer.default_root_dir={run_dir}", "--export_dir=null",
            ]
        )  # fmt: skip
    return (steps - warmup) / (TIMES["end"] - TIMES["start"])


def digits_loader(steps: int) -> torch.utils.data.DataLoader:
    """The DataModule's training DataLoader, as ``train.py`` builds it for one device."""
    from datamodules import ImageClassificationDataModule
    from datamodules.loaders import StepStreamDataLoader
    from datamodules.samplers import StepStreamSampler

    data = ImageClassificationDataModule("digits", processor=str(TINY), batch_size=BATCH_SIZE, num_workers=0)
    data.setup("fit")
    train = data.datasets["train"]
    return StepStreamDataLoader(train, batch_size=BATCH_SIZE, sampler=StepStreamSampler(len(train), BATCH_SIZE, steps))


def bare_rate(steps: int, warmup: int, preloaded: bool) -> float:
    from lightning_modules.classifier import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(10, model_name_or_path=str(TINY), pretrained=False).model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batches = digits_loader(steps)
    if preloaded:
        batches = list(batches)
    for step, (images, labels) in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(model(pixel_values=images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (steps - warmup) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the best counts")
    args = parser.parse_args()

    runs = {
        "bare loop (same DataLoader)": lambda: bare_rate(args.steps, args.warmup, preloaded=False),
        "train.py fit": lambda: lightning_rate(args.steps, args.warmup, progress_bar=True),
        "train.py fit, no progress bar": lambda: lightning_rate(args.steps, args.warmup, progress_bar=False),
        "bare loop (batches preloaded)": lambda: bare_rate(args.steps, args.warmup, preloaded=True),
    }
    best = dict.fromkeys(runs, 0.0)
    for repeat in range(args.repeats):
        # Every other repeat in reverse order, so no side always runs first or last.
        for name in list(runs)[:: -1 if repeat % 2 else 1]:
            best[name] = max(best[name], runs[name]())
    reference = best["bare loop (same DataLoader)"]
    print(
        f"\ntiny ConvNeXt (convnext-tiny-32), digits, batch {BATCH_SIZE}, CPU, {torch.get_num_threads()} threads, "
        f"{args.steps - args.warmup} timed steps, best of {args.repeats}"
    )
    for name, rate in best.items():
        print(f"{name:<32} {rate:6.2f} steps/s   {rate / reference:5.3f}x the bare loop")


if __name__ == "__main__":
    main()
