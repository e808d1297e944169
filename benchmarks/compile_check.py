"""``torch.compile`` for fine-tuning: speed and numerics against eager, on one GPU.

    python -m benchmarks.compile_check [--steps 200] [--rerun-steps 100] [--batch-size 64]
        [--precision 32-true] [--device cuda]

The model is facebook/convnext-base-224's shape (random weights written once with seed 0, a
fresh 47-class head seeded the same in every run), fine-tuned through ``Trainer.fit`` of
``ImageClassifier`` with the reference recipe's optimiser (SGD, lr 0.01, momentum 0.9, weight
decay 1e-4, constant rate) in the reference precision (``32-true``) on a fixed set of synthetic
224-px batches, drawn in the same seeded order by every run. Three runs:

1. eager, ``--steps`` steps;
2. compiled (``ImageClassifier(compile=True)``), ``--steps`` steps;
3. eager again, ``--rerun-steps`` steps: how far two eager runs of the same seed drift apart
   (cuDNN picks non-deterministic kernels), the yardstick for the compiled run's drift.

Printed: images/s after ``--warmup`` steps and the estimated time of a 4,000-step fine-tune
(training steps only, no validation) for eager and compiled, the compiled run's first-step time
(the compilation), the largest loss difference per step against eager over the whole run and
over its first 20 steps, and the largest relative difference of any weight tensor at the end.
It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset
from transformers import ConvNextConfig, ConvNextForImageClassification

from benchmarks.recipe import sgd_settings
from datamodules import ImagePreprocessor
from lightning_modules.classifier import ImageClassifier

BASE = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024])
NUM_CLASSES = 47


class StepRecorder(Callback):
    """Loss of every step (kept on the device until the end) and the wall clock at chosen steps."""

    def __init__(self, warmup: int, synchronize: bool) -> None:
        self.warmup, self.synchronize = warmup, synchronize
        self.losses: list[torch.Tensor] = []
        self.clock: dict[str, float] = {}

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.clock["first_start"] = self._now()
        if trainer.global_step == 1:
            self.clock["first_end"] = self._now()
        if trainer.global_step == self.warmup:
            self.clock["timed_start"] = self._now()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())

    def on_train_end(self, trainer, module) -> None:
        self.clock["timed_end"] = self._now()


def run(model_dir: Path, data: TensorDataset, steps: int, compile: bool, args: argparse.Namespace) -> dict:
    seed_everything(0, verbose=False)
    model = ImageClassifier(NUM_CLASSES, model_name_or_path=str(model_dir), compile=compile, **sgd_settings())
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True, pin_memory=args.device == "cuda",
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    recorder = StepRecorder(min(args.warmup, steps - 1), synchronize=args.device == "cuda")
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision, max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    clock = recorder.clock
    timed_steps = steps - recorder.warmup
    return {
        "losses": torch.stack(recorder.losses).float().cpu(),
        "weights": {name: tensor.detach().float().cpu() for name, tensor in model.model.state_dict().items()},
        "images_per_second": timed_steps * args.batch_size / (clock["timed_end"] - clock["timed_start"]),
        "first_step_seconds": clock["first_end"] - clock["first_start"],
    }


def largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, tensor in a.items():
        difference = float((tensor - b[name]).norm() / tensor.norm().clamp_min(1e-12))
        if difference > worst:
            worst, where = difference, name
    return worst, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rerun-steps", type=int, default=100, help="steps of the second eager run (0: none)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the clock starts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="distinct synthetic batches, cycled")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", default="32-true", help="Lightning precision (the reference: 32-true)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny ConvNeXt instead of base (a dry run on CPU)")
    args = parser.parse_args()
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
              f"matmul precision {torch.get_float32_matmul_precision()}", flush=True)  # fmt: skip
    config = ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64]) if args.tiny else BASE
    generator = torch.Generator().manual_seed(1)
    count = args.batches * args.batch_size
    data = TensorDataset(torch.randn(count, 3, args.image_size, args.image_size, generator=generator),
                         torch.randint(0, NUM_CLASSES, (count,), generator=generator))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        ConvNextForImageClassification(config).save_pretrained(model_dir)
        ImagePreprocessor().to_processor().save_pretrained(model_dir)
        eager = run(model_dir, data, args.steps, False, args)
        print(f"eager:    {eager['images_per_second']:7.1f} images/s, first step {eager['first_step_seconds']:.1f} s", flush=True)
        compiled = run(model_dir, data, args.steps, True, args)
        print(f"compiled: {compiled['images_per_second']:7.1f} images/s, first step {compiled['first_step_seconds']:.1f} s "
              f"(compilation)", flush=True)  # fmt: skip
        rerun = run(model_dir, data, args.rerun_steps, False, args) if args.rerun_steps else None
    for name, rate in (("eager", eager["images_per_second"]), ("compiled", compiled["images_per_second"])):
        print(f"4,000 steps x {args.batch_size} images {name}: {4000 * args.batch_size / rate / 60:.1f} min of training steps")
    print(f"speed-up {compiled['images_per_second'] / eager['images_per_second']:.2f}x; "
          f"loss at step 1 / {args.steps}: eager {eager['losses'][0]:.4f} / {eager['losses'][-1]:.4f}, "
          f"compiled {compiled['losses'][0]:.4f} / {compiled['losses'][-1]:.4f}")  # fmt: skip
    early = min(20, args.steps)
    loss_gap = (compiled["losses"] - eager["losses"]).abs()
    print(f"compiled vs eager: largest loss difference {loss_gap.max():.2e} over {args.steps} steps, {loss_gap[:early].max():.2e} over "
          f"the first {early}; weights at the end: largest relative difference {largest_relative_difference(eager['weights'], compiled['weights'])[0]:.2e}")  # fmt: skip
    if rerun is not None:
        steps = args.rerun_steps
        eager_gap = (rerun["losses"] - eager["losses"][:steps]).abs()
        print(f"eager vs eager (yardstick): largest loss difference {eager_gap.max():.2e} over {steps} steps, "
              f"{eager_gap[:early].max():.2e} over the first {early}; compiled vs eager over the same {steps}: {loss_gap[:steps].max():.2e}")  # fmt: skip
    every = max(1, args.steps // 10)
    print("loss curve (step: eager / compiled): " + ", ".join(
        f"{i + 1}: {eager['losses'][i]:.4f} / {compiled['losses'][i]:.4f}" for i in range(0, args.steps, every)))  # fmt: skip


if __name__ == "__main__":
    main()
