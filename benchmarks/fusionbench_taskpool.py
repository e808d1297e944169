"""FusionBench's own evaluation flow on the data and pool of ``benchmarks/eval_throughput.py``.

    /tmp/fbvenv/bin/python benchmarks/fusionbench_taskpool.py --cache /tmp/convnext-fusion-eval --size 224 \
        --workers 0 --batch-size 128

Runs in a separate venv holding ``fusion-bench==0.2.33`` (and ``torch==2.13.0``), never in the
project's: it imports nothing from this repository. ``benchmarks/eval_throughput.py
--fusionbench-python /tmp/fbvenv/bin/python`` starts it in a fresh process per measurement, times
the whole process and reads the one JSON line it prints: ``loop_seconds``, the time spent in
``ImageClassificationTaskPool._evaluate`` (the per-task loops over the test DataLoaders, worker
start-up included), and the accuracy per task.

The flow, as FusionBench's Python API spells it for a ConvNeXt pool: a
``ConvNextForImageClassificationPool`` over ``_pretrained_`` and the two fine-tuned checkpoints
(plain directories), ``SimpleAverageAlgorithm().run(pool)`` (it averages the ``convnext``
submodules), every task's head collected from its loaded model (``pool.load_model(task).classifier``)
into FusionBench's ``SwitchModule`` as the merged model's classifier (``evaluate`` switches it per
task with ``set_active_option``), then ``ImageClassificationTaskPool(test_datasets=..., processor=
<processor directory>, dataloader_kwargs={batch_size, num_workers}).evaluate(model)`` on one CPU
device (``lightning.Fabric(accelerator="cpu", devices=1)``). The test splits are read with
``datasets.load_from_disk``; the processor is the Hugging Face one (``AutoProcessor``, the PIL
backend without torchvision), applied per image by FusionBench's ``ImageClassificationDataset``.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an older
Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import typing
from pathlib import Path

import typing_extensions

if not hasattr(typing, "override"):
    typing.override = typing_extensions.override

import lightning as L  # noqa: E402
import torch  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from fusion_bench.method import SimpleAverageAlgorithm  # noqa: E402
from fusion_bench.modelpool import ConvNextForImageClassificationPool  # noqa: E402
from fusion_bench.models.wrappers.switch import SwitchModule  # noqa: E402
from fusion_bench.taskpool.image_classification import ImageClassificationTaskPool  # noqa: E402

TASKS = ("mnist", "gtsrb")
LOOP = {"seconds": 0.0}


def timed(function):
    """``function`` with its wall time added to ``LOOP``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            LOOP["seconds"] += time.perf_counter() - start

    return wrapper


def merged_model(cache: Path) -> torch.nn.Module:
    pool = ConvNextForImageClassificationPool(models={name: str(cache / "pool" / name) for name in ("_pretrained_", *TASKS)})
    with torch.no_grad():
        merged = SimpleAverageAlgorithm().run(pool)
    merged.classifier = SwitchModule({task: pool.load_model(task).classifier for task in TASKS})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/convnext-fusion-eval"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    model = merged_model(args.cache)
    taskpool = ImageClassificationTaskPool(
        test_datasets={task: load_from_disk(str(args.cache / "data" / task))["test"] for task in TASKS},
        processor=str(args.cache / f"processor-{args.size}"),
        dataloader_kwargs={"batch_size": args.batch_size, "num_workers": args.workers},
    )
    taskpool.fabric = L.Fabric(accelerator="cpu", devices=1)
    taskpool._evaluate = timed(taskpool._evaluate)
    report = taskpool.evaluate(model)
    accuracy = {task: report[task]["accuracy"] for task in TASKS}
    print(json.dumps({"loop_seconds": LOOP["seconds"], "accuracy": accuracy}))


if __name__ == "__main__":
    main()
