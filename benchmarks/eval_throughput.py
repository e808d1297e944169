"""Evaluation speed: the ``merge.py test`` path against a bare PyTorch loop and FusionBench's task pool.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.eval_throughput [--repeats 3] [--sizes 32,224]
        [--workers 0,2] [--batch-size 128] [--cache /tmp/convnext-fusion-eval]
        [--fusionbench-python /tmp/fbvenv/bin/python] [--profile] [--model tiny|base] [--accelerator cpu|gpu]

Data (written once into ``--cache``, reused afterwards): the real samples of ``../shared/data``
as ``save_to_disk`` datasets with a ``test`` split, the full MNIST test set (10,000 28x28
digits, PNG-encoded as on the hub) and the 430 GTSRB test images (their PPM bytes), 10,430
images in all. Models: a tiny ConvNeXt pool (``depths=[1,1,1,1]``, ``hidden_sizes=[8,16,32,64]``,
random weights; a ``_pretrained_`` model and one "fine-tuned" model per task, the pretrained
backbone plus seeded noise and the task's head), merged by simple average; ``--model base`` makes
the pool facebook/convnext-base-224's shape instead (its own cache, ``-base`` appended), and
``--accelerator gpu`` runs ``merge.py test`` and the bare loop on one GPU (pinned memory, as
``merge.py`` does there). The image processor
is either the quickstart's tiny 32-pixel one (``configs/quickstart/convnext-tiny-32``) or
facebook/convnext-base-224's settings (resize the shorter side to 256, bicubic, centre-crop 224).

Each measurement runs in a fresh process, on the same images, model, batch size and workers:

* ``merge.py test``: the whole command as a user runs it (``python merge.py test --config ...``,
  logger off, the progress bar of the shipped merge configs), wall time from start to exit: imports,
  merging the pool, ``prepare_data``, loading the datasets, the test loop, the report. The same
  run carries ``TestLoopTimer``, a callback timing ``on_test_epoch_start`` -> ``on_test_epoch_end``
  (every batch of both tasks, the second loader's workers starting included): the test loop.
* bare loop: plain PyTorch over the project's own ``ImageClassificationDataset`` and
  ``ImagePreprocessor``: one ``DataLoader`` per task, ``torch.inference_mode``, the merged
  backbone with the task's head (``merge.py``'s own per-task export), argmax, count. Timed from
  creating the first loader's iterator to the last batch; the process's wall time too.
* FusionBench 0.2.33 (with ``--fusionbench-python``, a venv of its own; the script,
  ``benchmarks/fusionbench_taskpool.py``, imports nothing from the project): its
  ``ConvNextForImageClassificationPool`` over the same three checkpoints,
  ``SimpleAverageAlgorithm``, the task heads in its ``SwitchModule``, and
  ``ImageClassificationTaskPool.evaluate`` with the processor directory; the process's wall
  time and the time inside its per-task evaluation loops (``_evaluate``).

The sides alternate ``--repeats`` times (every other round in reverse order); best and median of
each are printed with the load averages before and after, and the accuracies of the three sides
as a check that they score the same images with the same model. ``--profile`` runs one
``merge.py test`` under cProfile instead and prints where the time goes. It measures and
prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

# `--trainer.callbacks=[{class_path: benchmarks.eval_throughput.TestLoopTimer ...` imports this
# module by name; under `python -m` make that name this very module.
sys.modules.setdefault("benchmarks.eval_throughput", sys.modules[__name__])

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_CACHE = Path("/tmp/convnext-fusion-eval")
TASKS = ("mnist", "gtsrb")
TINY = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64]}
BASE = {"depths": [3, 3, 27, 3], "hidden_sizes": [128, 256, 512, 1024]}  # facebook/convnext-base-224
SHAPES = {"tiny": TINY, "base": BASE}


def default_cache(model: str) -> Path:
    """One cache per pool shape: ``/tmp/convnext-fusion-eval`` (tiny), ``/tmp/convnext-fusion-eval-base``."""
    return DEFAULT_CACHE if model == "tiny" else DEFAULT_CACHE.with_name(f"{DEFAULT_CACHE.name}-{model}")


SIDES = ("merge.py test", "bare loop", "fusionbench")


class TestLoopTimer(Callback):
    """Writes ``{"start", "end"}`` (``time.perf_counter``) of the test epoch to ``path``.

    Args:
        path: the JSON file to write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = 0.0

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        Path(self.path).write_text(json.dumps({"start": self.start, "end": time.perf_counter()}))


# ---------------------------------------------------------------- the data and models, once


def _mnist_rows() -> dict[str, list]:
    import io

    import numpy as np
    from PIL import Image

    images = gzip.decompress((SHARED_DATA / "mnist-t10k" / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((SHARED_DATA / "mnist-t10k" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    pixels = np.frombuffer(images, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")  # the hub's MNIST holds PNGs
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    return {"image": encoded, "label": list(np.frombuffer(labels, dtype=np.uint8, offset=8).astype(int))}


def _gtsrb_rows() -> dict[str, list]:
    folder = SHARED_DATA / "gtsrb-test-430"
    lines = (folder / "labels.csv").read_text().splitlines()[1:]
    rows = [line.split(",") for line in lines if line.strip()]
    return {
        "image": [{"bytes": (folder / name).read_bytes(), "path": None} for name, *_ in rows],
        "label": [int(row[1]) for row in rows],
    }


def write_datasets(cache: Path) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    from datamodules.tasks import get_task

    for task, rows in (("mnist", _mnist_rows), ("gtsrb", _gtsrb_rows)):
        target = cache / "data" / task
        if (target / "dataset_dict.json").is_file():
            continue
        features = Features({"image": Image(), "label": ClassLabel(names=list(get_task(task).classnames))})
        DatasetDict({"test": Dataset.from_dict(rows(), features=features)}).save_to_disk(str(target))


def write_pool(cache: Path, shape: dict, tasks: tuple[str, ...] = TASKS) -> None:
    """A ``_pretrained_`` ConvNeXt of ``shape`` and one fine-tuned model per task of ``tasks`` (backbone
    + noise, own head), under ``cache / "pool"``."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from datamodules.tasks import get_task

    torch.manual_seed(0)
    pretrained = ConvNextForImageClassification(ConvNextConfig(**shape, num_labels=10))
    with torch.no_grad():  # layer scale starts at 1e-6: give the blocks weight, as a trained model has
        for name, parameter in pretrained.named_parameters():
            if name.endswith("layer_scale_parameter"):
                parameter.fill_(0.5)
    pretrained.save_pretrained(cache / "pool" / "_pretrained_")
    generator = torch.Generator().manual_seed(1)
    for task in tasks:
        names = list(get_task(task).classnames)
        config = ConvNextConfig(
            **shape, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
        )
        model = ConvNextForImageClassification(config)
        state = {
            k: v + 0.05 * torch.randn(v.shape, generator=generator)
            for k, v in pretrained.state_dict().items()
            if k.startswith("convnext.")
        }
        state["classifier.weight"] = 0.3 * torch.randn((len(names), shape["hidden_sizes"][-1]), generator=generator)
        state["classifier.bias"] = 0.1 * torch.randn(len(names), generator=generator)
        model.load_state_dict(state)
        model.save_pretrained(cache / "pool" / task)


def write_processors(cache: Path) -> None:
    from datamodules import ImagePreprocessor

    (cache / "processor-32").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "quickstart" / "convnext-tiny-32" / "preprocessor_config.json", cache / "processor-32")
    ImagePreprocessor().to_processor().save_pretrained(cache / "processor-224")  # convnext-base-224's settings
    for directory in ("_pretrained_", *TASKS):  # a pool checkpoint carries its processor (the exports copy it)
        ImagePreprocessor().to_processor().save_pretrained(cache / "pool" / directory)


def merge_config(cache: Path, size: int) -> Path:
    """The ``merge.py test`` config of one processor size (batch size and workers on the command line)."""
    import yaml

    shipped = yaml.safe_load((REPO / "configs" / "quickstart" / "merge.yaml").read_text())["trainer"]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "default_root_dir": str(cache / "runs" / f"merge-{size}"),
            "callbacks": shipped["callbacks"],  # the shipped merge configs' progress bar
        },
        "model": {
            "class_path": "lightning_modules.merged.MergedClassifier",
            "init_args": {
                "models": {name: str(cache / "pool" / name) for name in ("_pretrained_", *TASKS)},
                "method": {"class_path": "merging.SimpleAverage"},
                "report_dir": str(cache / "runs" / f"merge-{size}"),
            },
        },
        "data": {
            "tasks": list(TASKS),
            "paths": {task: str(cache / "data" / task) for task in TASKS},
            "processor": str(cache / f"processor-{size}"),
        },
    }
    path = cache / f"merge-{size}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepare(cache: Path, model: str) -> None:
    """Datasets, pool, processors, configs and the merged model's per-task export, unless there."""
    cache.mkdir(parents=True, exist_ok=True)
    write_datasets(cache)
    if not (cache / "exports" / TASKS[-1] / "config.json").is_file():
        write_pool(cache, SHAPES[model])
        write_processors(cache)
        from merge import main

        sys.argv = ["merge.py"]  # LightningCLI warns about arguments given both ways
        shutil.rmtree(cache / "exports", ignore_errors=True)
        main(["test", "--config", str(merge_config(cache, 224)), "--trainer.limit_test_batches", "0",
              "--model.export_dir", str(cache / "exports"), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    for size in (32, 224):
        merge_config(cache, size)


# ---------------------------------------------------------------- the bare loop (a child process)


def bare_loop(cache: Path, size: int, workers: int, batch_size: int, accelerator: str) -> dict:
    import torch
    from datasets import load_from_disk
    from torch.utils.data import DataLoader
    from transformers import ConvNextForImageClassification

    from datamodules import ImagePreprocessor
    from datamodules.torch_data import ImageClassificationDataset

    cuda = accelerator == "gpu"
    device = torch.device("cuda" if cuda else "cpu")
    preprocess = ImagePreprocessor.from_pretrained(str(cache / f"processor-{size}"))
    loaders, models = {}, {}
    for task in TASKS:
        dataset = ImageClassificationDataset(load_from_disk(str(cache / "data" / task))["test"], preprocess)
        loaders[task] = DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0, pin_memory=cuda
        )
        models[task] = ConvNextForImageClassification.from_pretrained(cache / "exports" / task).eval().to(device)
    correct, images = {}, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for task, loader in loaders.items():
            correct[task] = 0
            for pixels, labels in loader:
                pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                correct[task] += int((models[task](pixel_values=pixels).logits.argmax(-1) == labels).sum())
                images += len(labels)
    seconds = time.perf_counter() - start
    accuracy = {task: correct[task] / len(loaders[task].dataset) for task in TASKS}
    return {"loop_seconds": seconds, "images": images, "accuracy": accuracy}


# ---------------------------------------------------------------- the parent


def run_timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall time of ``command`` from start to exit, and its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def run_merge(cache: Path, size: int, workers: int, batch_size: int, accelerator: str) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        timer = {"class_path": "benchmarks.eval_throughput.TestLoopTimer", "init_args": {"path": f"{scratch}/loop.json"}}
        command = [sys.executable, "merge.py", "test", "--config", str(cache / f"merge-{size}.yaml"),
                   f"--data.batch_size={batch_size}", f"--data.num_workers={workers}", f"--trainer.accelerator={accelerator}",
                   f"--trainer.callbacks+={json.dumps(timer)}"]  # fmt: skip
        seconds, _ = run_timed(command)
        loop = json.loads(Path(scratch, "loop.json").read_text())
    report = json.loads((cache / "runs" / f"merge-{size}" / "report.json").read_text())
    tasks = next(iter(report["rows"].values()))["tasks"]
    return {
        "process_seconds": seconds,
        "loop_seconds": loop["end"] - loop["start"],
        "accuracy": {t: tasks[t]["accuracy"] for t in TASKS},
    }


def run_child(command: list[str], env: dict[str, str] | None = None) -> dict:
    seconds, stdout = run_timed(command, env)
    return {**json.loads(stdout.strip().splitlines()[-1]), "process_seconds": seconds}


def side_commands(args: argparse.Namespace, size: int, workers: int) -> dict:
    common = ["--cache", str(args.cache), "--size", str(size), "--workers", str(workers), "--batch-size", str(args.batch_size)]
    sides = {
        "merge.py test": lambda: run_merge(args.cache, size, workers, args.batch_size, args.accelerator),
        "bare loop": lambda: run_child(
            [sys.executable, "-m", "benchmarks.eval_throughput", "--child", "bare", *common, "--accelerator", args.accelerator]
        ),
    }
    if args.fusionbench_python:
        script = str(REPO / "benchmarks" / "fusionbench_taskpool.py")
        # PYTHONPATH emptied: nothing of the project is importable on that side.
        sides["fusionbench"] = lambda: run_child([args.fusionbench_python, script, *common], {"PYTHONPATH": ""})
    return sides


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def measure(args: argparse.Namespace) -> dict[tuple[int, int], dict[str, list[dict]]]:
    results = {}
    for size in args.sizes:
        for workers in args.workers:
            sides = side_commands(args, size, workers)
            runs = results[(size, workers)] = {side: [] for side in sides}
            for repeat in range(args.repeats):
                # Every other round in reverse order, so no side always runs first.
                for side in list(sides)[:: -1 if repeat % 2 else 1]:
                    runs[side].append(sides[side]())
                    last = runs[side][-1]
                    print(f"[{size} px, {workers} workers, {repeat + 1}/{args.repeats}] {side:14s} process {last['process_seconds']:6.2f} s"
                          f"  loop {last['loop_seconds']:6.2f} s  load {load_average()}", flush=True)  # fmt: skip
    return results


def summarize(results: dict[tuple[int, int], dict[str, list[dict]]], images: int, batch_size: int) -> None:
    print(f"\n{images:,} images (MNIST test 10,000 + GTSRB 430), batch {batch_size}; images/s, best / median")
    print(f"{'px':>4s} {'workers':>7s} {'side':14s} {'whole process':>16s} {'loop':>16s}   accuracy (mnist, gtsrb)")
    for (size, workers), runs in results.items():
        for side, side_runs in runs.items():
            process = [images / run["process_seconds"] for run in side_runs]
            loop = [images / run["loop_seconds"] for run in side_runs]
            accuracy = ", ".join(f"{side_runs[0]['accuracy'][task]:.4f}" for task in TASKS)
            print(f"{size:4d} {workers:7d} {side:14s} {max(process):7.0f} / {statistics.median(process):<7.0f}"
                  f" {max(loop):7.0f} / {statistics.median(loop):<7.0f}   {accuracy}")  # fmt: skip
        ratios(runs)


def ratios(runs: dict[str, list[dict]]) -> None:
    def median(side: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[side])

    def best(side: str, key: str) -> float:
        return min(run[key] for run in runs[side])

    ours = "merge.py test"
    line = (f"{'':12s} test loop / bare loop: {best('bare loop', 'loop_seconds') / best(ours, 'loop_seconds'):.2f}x (best), "
            f"{median('bare loop', 'loop_seconds') / median(ours, 'loop_seconds'):.2f}x (median)")  # fmt: skip
    if "fusionbench" in runs:
        line += (f"; whole command / FusionBench process: {best('fusionbench', 'process_seconds') / best(ours, 'process_seconds'):.2f}x (best), "
                 f"{median('fusionbench', 'process_seconds') / median(ours, 'process_seconds'):.2f}x (median); "
                 f"loops {median('fusionbench', 'loop_seconds') / median(ours, 'loop_seconds'):.2f}x (median)")  # fmt: skip
    print(line)


def profile(args: argparse.Namespace) -> None:
    """One ``merge.py test`` under cProfile: the functions with the largest cumulative time."""
    size, workers = args.sizes[-1], args.workers[0]
    with tempfile.TemporaryDirectory() as scratch:
        out = f"{scratch}/merge.prof"
        command = [sys.executable, "-m", "cProfile", "-o", out, "merge.py", "test", "--config", str(args.cache / f"merge-{size}.yaml"),
                   f"--data.batch_size={args.batch_size}", f"--data.num_workers={workers}"]  # fmt: skip
        seconds, _ = run_timed(command)
        print(f"merge.py test under cProfile, {size} px, {workers} workers: {seconds:.1f} s")
        import pstats

        pstats.Stats(out).sort_stats("cumulative").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        help="where the datasets, pool and configs are written once (default: /tmp/convnext-fusion-eval[-base])",
    )
    parser.add_argument(
        "--model",
        choices=sorted(SHAPES),
        default="tiny",
        help="pool shape: tiny, or facebook/convnext-base-224's (random weights)",
    )
    parser.add_argument(
        "--accelerator",
        choices=["cpu", "gpu"],
        default="cpu",
        help="where merge.py test and the bare loop run (FusionBench: CPU)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=lambda text: [int(s) for s in text.split(",")], default=[32, 224], help="processor sizes")
    parser.add_argument("--workers", type=lambda text: [int(w) for w in text.split(",")], default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every measured process (default: torch's, one per core)")
    parser.add_argument("--fusionbench-python", help="python of a venv with fusion-bench==0.2.33")
    parser.add_argument("--profile", action="store_true", help="profile one merge.py test run instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache = args.cache or default_cache(args.model)
    if args.accelerator == "gpu" and args.fusionbench_python:
        parser.error("--fusionbench-python: its task pool runs on the CPU; compare it with --accelerator cpu")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every measured process
    if args.child == "bare":
        print(json.dumps(bare_loop(args.cache, args.size, args.workers[0], args.batch_size, args.accelerator)))
        return
    if args.child == "prepare":
        prepare(args.cache, args.model)
        return
    # The parent stays small: the data and models are written in a child of their own.
    subprocess.run([sys.executable, "-m", "benchmarks.eval_throughput", "--cache", str(args.cache), "--model", args.model, "--child", "prepare"],
                   cwd=REPO, check=True)  # fmt: skip
    if args.profile:
        profile(args)
        return
    threads = os.environ.get("OMP_NUM_THREADS", "torch's default")
    print(f"load averages at the start: {load_average()}; OMP_NUM_THREADS {threads}", flush=True)
    results = measure(args)
    print(f"load averages at the end: {load_average()}")
    images = next(iter(results.values()))["bare loop"][0]["images"]
    summarize(results, images=images, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
