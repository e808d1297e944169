"""Training speed: ``train.py fit`` against a bare PyTorch loop doing the same work.

    HF_HUB_OFFLINE=1 python -m benchmarks.train_throughput [--steps 120] [--warmup 10] [--repeats 2]

Both sides fine-tune the tiny ConvNeXt of ``configs/quickstart/convnext-tiny-32`` (random
init) on the built-in ``digits`` task, global batch 64, fp32, on the CPU with the process's
torch threads, ``num_workers`` 0. The Lightning side is the real CLI
(``configs/quickstart/digits.yaml`` with logger, checkpointing, validation and export off,
and the config's other callbacks as shipped: its progress bar, a ``TQDMProgressBar`` redrawn
every 10 steps, as a user sees it); the bare side is the same model class, the same
DataLoader (same sampler, same preprocessing, same batches) and ``forward / cross_entropy /
zero_grad / backward / SGD.step``. Each side is timed from the start of step ``warmup`` to
the end of the last step, so start-up is excluded; the sides alternate ``repeats`` times
(every other round in reverse order) and the best and the median rate of each are printed, so
a busy machine slows both alike. It prints; it asserts nothing. Beside steps per second of wall
time it prints steps per CPU-second of the process (``time.process_time``, every thread of it, a
progress bar's refresh thread included), which other jobs on a shared machine disturb less (with
one torch thread; with more, threads spinning at a barrier count too).
The "Lightning's default Rich bar" row is the configuration before the shipped bar (no progress
bar in the config, Lightning picks its Rich bar); "no progress bar" isolates the training loop
and the module's own logging; "preloaded" shows what the data loading costs both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.nn import functional as F

from benchmarks.recipe import sgd_settings

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
            TIMES["start"], TIMES["cpu_start"] = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        TIMES["end"], TIMES["cpu_end"] = time.perf_counter(), time.process_time()


CONFIG = REPO / "configs" / "quickstart" / "digits.yaml"


def callbacks(bar: str, warmup: int) -> list[dict]:
    """The timer after the config's callbacks but its checkpointing (``shipped``: its progress bar
    too), or after none (``rich``: Lightning's default bar; ``off``: no bar)."""
    timer = {"class_path": "benchmarks.train_throughput.StepTimer", "init_args": {"warmup": warmup}}
    if bar != "shipped":
        return [timer]
    listed = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]
    return [callback for callback in listed if not callback["class_path"].endswith("ModelCheckpoint")] + [timer]


def lightning_rate(steps: int, warmup: int, bar: str) -> tuple[float, float]:
    from train import main

    TIMES.clear()
    with tempfile.TemporaryDirectory() as run_dir:  # the run's config.yaml, away from a real quickstart
        main(
            [
                "fit", "--config", str(CONFIG),
                f"--model.model_name_or_path={TINY}", "--model.pretrained=false", f"--data.processor={TINY}",
                f"--data.batch_size={BATCH_SIZE}", "--data.num_workers=0",
                f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
                "--trainer.enable_checkpointing=false", f"--trainer.callbacks={json.dumps(callbacks(bar, warmup))}",
                f"--trainer.enable_progress_bar={str(bar != 'off').lower()}", "--trainer.enable_model_summary=false",
                f"--trainer.default_root_dir={run_dir}", "--export_dir=null",
            ]
        )  # fmt: skip
    return (steps - warmup) / (TIMES["end"] - TIMES["start"]), (steps - warmup) / (TIMES["cpu_end"] - TIMES["cpu_start"])


def digits_loader(steps: int) -> torch.utils.data.DataLoader:
    """The DataModule's training DataLoader, as ``train.py`` builds it for one device."""
    from datamodules import ImageClassificationDataModule
    from datamodules.loaders import StepStreamDataLoader
    from datamodules.samplers import StepStreamSampler

    data = ImageClassificationDataModule("digits", processor=str(TINY), batch_size=BATCH_SIZE, num_workers=0)
    data.setup("fit")
    train = data.datasets["train"]
    return StepStreamDataLoader(train, batch_size=BATCH_SIZE, sampler=StepStreamSampler(len(train), BATCH_SIZE, steps))


def bare_rate(steps: int, warmup: int, preloaded: bool) -> tuple[float, float]:
    from lightning_modules.classifier import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(10, model_name_or_path=str(TINY), pretrained=False, **sgd_settings()).model.train()
    optimizer = torch.optim.SGD(model.parameters(), **sgd_settings())
    batches = digits_loader(steps)
    if preloaded:
        batches = list(batches)
    for step, (images, labels) in enumerate(batches):
        if step == warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(model(pixel_values=images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (steps - warmup) / (time.perf_counter() - start), (steps - warmup) / (time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    args = parser.parse_args()

    runs = {
        "bare loop (same DataLoader)": lambda: bare_rate(args.steps, args.warmup, preloaded=False),
        "train.py fit (shipped config)": lambda: lightning_rate(args.steps, args.warmup, bar="shipped"),
        "train.py fit, Lightning's Rich bar": lambda: lightning_rate(args.steps, args.warmup, bar="rich"),
        "train.py fit, no progress bar": lambda: lightning_rate(args.steps, args.warmup, bar="off"),
        "bare loop (batches preloaded)": lambda: bare_rate(args.steps, args.warmup, preloaded=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpu_rates: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        # Every other repeat in reverse order, so no side always runs first or last.
        for name in list(runs)[:: -1 if repeat % 2 else 1]:
            wall, cpu = runs[name]()
            rates[name].append(wall)
            cpu_rates[name].append(cpu)
    report(rates, args, "steps/s")
    report(cpu_rates, args, "steps per CPU-second of the process (all its threads)")


def report(rates: dict[str, list[float]], args: argparse.Namespace, unit: str) -> None:
    best = {name: max(values) for name, values in rates.items()}
    median = {name: statistics.median(values) for name, values in rates.items()}
    reference = "bare loop (same DataLoader)"
    print(
        f"\ntiny ConvNeXt (convnext-tiny-32), digits, batch {BATCH_SIZE}, CPU, {torch.get_num_threads()} threads, "
        f"{args.steps - args.warmup} timed steps, {args.repeats} runs each; {unit} and x the bare loop, best / median"
    )
    for name in rates:
        print(
            f"{name:<36} {best[name]:6.2f} / {median[name]:6.2f}   "
            f"{best[name] / best[reference]:5.3f}x / {median[name] / median[reference]:5.3f}x"
        )


if __name__ == "__main__":
    main()
