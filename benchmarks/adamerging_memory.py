"""Peak memory of AdaMerging on eight convnext-base-224-sized models, on CPU or one GPU.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.adamerging_memory [--device cpu|cuda]
        [--cache DIR] [--granularity layer|task] [--steps 3] [--batch-size 2] [--image-size 224]

The checkpoints are nine Hugging Face directories (``config.json`` + ``model.safetensors``):
a "pretrained" ConvNeXt of facebook/convnext-base-224's shape (depths 3/3/27/3, widths
128-1024, random weights, 1000-class head, about 88.6M parameters, 354 MB in fp32) and eight
"fine-tuned" ones, the pretrained backbone plus small noise and a 10-class head each. The
layout and the code that writes them are ``benchmarks/merge_speed.py``'s: its cache
(``/tmp/convnext-fusion-bench``) is used when it is complete, otherwise they are written once to
``/tmp/convnext-fusion-bench-ada``.

The measurement runs in a fresh subprocess, so nothing else is in its peak:

1. ``AdaMerging(...).build()``: the pretrained backbone and the eight stacked task vectors,
   fp32, on the CPU (``setup`` builds before Lightning moves the module to its device).
   Reported: the process's peak RSS after it (``ru_maxrss``, imports included; the import
   floor is printed too) against the expected size, (1 + 8) x the backbone in fp32.
2. ``Trainer.fit`` for ``--steps`` steps, ``--batch-size`` random images per task and step
   (every task's head, all eight tasks each step): peak RSS again and, on CUDA,
   ``torch.cuda.max_memory_allocated`` (the module's tensors after the move, and the peak
   over the steps, which adds the merged weights, their gradient and the activations).

It measures and prints; it asserts nothing. Only torch, transformers, lightning and this
repository's modules are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.merge_speed import NUM_CLASSES, benchmark_tasks, checkpoint_dirs, complete, prepare, warm_page_cache

REPO = Path(__file__).resolve().parents[1]
SHARED_CACHE = Path("/tmp/convnext-fusion-bench")  # benchmarks/merge_speed.py's
OWN_CACHE = Path("/tmp/convnext-fusion-bench-ada")
MIB = 1024 * 1024


def classnames(tasks: list[str]) -> dict[str, list[str]]:
    return {task: [f"{task}_class_{i}" for i in range(NUM_CLASSES)] for task in tasks}


# ---------------------------------------------------------------- the measured child process


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mib() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _child(args: argparse.Namespace) -> dict[str, float | str]:
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.utilities import CombinedLoader
    from torch.utils.data import DataLoader, Dataset

    if args.baseline:  # another checkout's AdaMerging (e.g. the one graph over all tasks)
        sys.path.insert(0, str(Path(args.baseline).resolve()))
    from lightning_modules.adamerging import AdaMerging

    class RandomImages(Dataset):
        def __init__(self, size: int, image_size: int, seed: int) -> None:
            self.size, self.image_size, self.seed = size, image_size, seed

        def __len__(self) -> int:
            return self.size

        def __getitem__(self, index: int) -> torch.Tensor:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
            return torch.randn(3, self.image_size, self.image_size, generator=generator)

    cuda = args.device == "cuda"
    result: dict[str, float | str] = {"import_floor_rss_mib": _peak_rss_mib()}
    tasks = args.task_names.split(",")
    models = {name: str(path) for name, path in checkpoint_dirs(Path(args.cache), tasks).items()}
    output = tempfile.mkdtemp(prefix="adamerging-memory-")
    model = AdaMerging(tasks, classnames(tasks), models, granularity=args.granularity, output_dir=output, report_dir=output)
    start = time.perf_counter()
    model.build()
    result["build_seconds"] = time.perf_counter() - start
    result["build_peak_rss_mib"] = _peak_rss_mib()
    result["after_build_rss_mib"] = _rss_mib()
    tensors = list(model.backbone.parameters()) + list(model.task_vectors.buffers())
    result["module_tensors_mib"] = sum(t.numel() * t.element_size() for t in tensors) / MIB
    result["backbone_fp32_mib"] = sum(p.numel() * 4 for p in model.backbone.parameters()) / MIB

    if args.steps > 0:  # 0: measure the build only
        loaders = {
            task: DataLoader(RandomImages(args.steps * args.batch_size, args.image_size, index), batch_size=args.batch_size)
            for index, task in enumerate(tasks)
        }
        trainer = Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.fit(model, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
        result["fit_seconds"] = time.perf_counter() - start
        result["fit_peak_rss_mib"] = _peak_rss_mib()
        if cuda:
            torch.cuda.synchronize()
            result["cuda_allocated_after_fit_mib"] = torch.cuda.memory_allocated() / MIB
            result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
            result["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
            result["cuda_device"] = torch.cuda.get_device_name()
    result["coefficients_range"] = f"{float(model.coefficients.min()):.4f}..{float(model.coefficients.max()):.4f}"
    return result


# ---------------------------------------------------------------- the parent


def measure(args: argparse.Namespace) -> dict[str, float | str]:
    command = [sys.executable, "-m", "benchmarks.adamerging_memory", "--child", "--cache", args.cache, "--device", args.device,
               "--granularity", args.granularity, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--task-names", ",".join(args.tasks_chosen)]  # fmt: skip
    if args.baseline:
        command += ["--baseline", args.baseline]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"the measured process failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, result: dict[str, float | str]) -> None:
    backbone = float(result["backbone_fp32_mib"])
    count = len(args.tasks_chosen)
    expected = (1 + count) * backbone
    floor = float(result["import_floor_rss_mib"])
    print(f"AdaMerging ({args.granularity}-wise), {count} convnext-base-224-sized models, device {args.device}"
          + (f", baseline {args.baseline}" if args.baseline else "")
          + (f" ({result['cuda_device']})" if "cuda_device" in result else ""))  # fmt: skip
    print(f"  expected: pretrained + {count} task vectors = {1 + count} x {backbone:.1f} MiB = {expected:.0f} MiB "
          f"({expected * MIB / 1e9:.2f} GB)")  # fmt: skip
    print(f"  module tensors after build:     {float(result['module_tensors_mib']):8.0f} MiB")
    print(f"  import floor (peak RSS):        {floor:8.0f} MiB")
    print(f"  build: {float(result['build_seconds']):.1f} s, peak RSS {float(result['build_peak_rss_mib']):8.0f} MiB "
          f"(above the floor: {float(result['build_peak_rss_mib']) - floor:.0f} MiB), RSS after {float(result['after_build_rss_mib']):.0f} MiB")  # fmt: skip
    if "fit_seconds" not in result:
        return
    print(f"  fit, {args.steps} steps x {args.batch_size} images/task ({args.image_size} px): {float(result['fit_seconds']):.1f} s, "
          f"peak RSS {float(result['fit_peak_rss_mib']):.0f} MiB")  # fmt: skip
    if "cuda_peak_allocated_mib" in result:
        print(f"  CUDA: peak allocated {float(result['cuda_peak_allocated_mib']):.0f} MiB, peak reserved "
              f"{float(result['cuda_peak_reserved_mib']):.0f} MiB, allocated after fit {float(result['cuda_allocated_after_fit_mib']):.0f} MiB")  # fmt: skip
    print(f"  coefficients after fit: {result['coefficients_range']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cache", default=None, help=f"checkpoint cache (default: {SHARED_CACHE} if complete, else {OWN_CACHE})")
    parser.add_argument("--granularity", choices=["layer", "task"], default="layer")
    parser.add_argument("--steps", type=int, default=3, help="training steps after the build (0: the build only)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per task and step")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tasks", type=int, default=8, help="tasks (fine-tuned models): the first of TALL20, 8 the eight")
    parser.add_argument("--baseline", help="a checkout whose lightning_modules.adamerging is measured instead")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task-names", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return
    args.tasks_chosen = benchmark_tasks(args.tasks)
    if args.cache is None:
        args.cache = str(SHARED_CACHE if complete(SHARED_CACHE, args.tasks_chosen) else OWN_CACHE)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
    prepare(Path(args.cache), args.tasks_chosen)
    warm_page_cache(checkpoint_dirs(Path(args.cache), args.tasks_chosen))
    print(f"checkpoints: {args.cache}", flush=True)
    report(args, measure(args))


if __name__ == "__main__":
    main()
