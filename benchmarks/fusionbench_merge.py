"""FusionBench's own SimpleAverage flow on the checkpoints of ``benchmarks/merge_speed.py``.

    /tmp/fbvenv/bin/python benchmarks/fusionbench_simple_average.py [--cache /tmp/convnext-fusion-bench] [--no-heads]

Runs in a separate venv holding ``fusion-bench==0.2.33`` (and ``torch==2.13.0``), never in
the project's: it imports nothing from this repository. ``benchmarks/merge_speed.py
--fusionbench-python /tmp/fbvenv/bin/python`` starts it in a fresh process per measurement and
reads the one JSON line it prints: ``seconds`` from building the pool to the saved model,
``peak_rss_mib`` (``ru_maxrss`` of the whole process) and ``import_floor_mib`` (the peak after
the imports, which are done before the clock starts).

The flow, as FusionBench's configs for convnext-base-224 spell it: a
``ConvNextForImageClassificationPool`` over the nine local directories (plain paths, so each
model loads with ``AutoModelForImageClassification.from_pretrained``; ``_pretrained_`` is given as
``{config_path, pretrained: true}`` since ``save_model`` fails on a plain path there), every task's head
collected from its loaded model (``pool.load_model(task).classifier``; FusionBench 0.2.33 has no
other way to reach the heads, so each model is loaded a second time), then
``SimpleAverageAlgorithm().run(pool)`` (it averages the ``convnext`` submodule of the eight
fine-tuned models), then ``pool.save_model(merged, out)`` (``save_pretrained`` of the merged
model and its image processor) and the heads into ``heads.safetensors`` beside it. With
``--no-heads`` the heads are neither collected nor saved.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an
older Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
import typing
from pathlib import Path

import typing_extensions

if not hasattr(typing, "override"):
    typing.override = typing_extensions.override

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fusion_bench.method import SimpleAverageAlgorithm  # noqa: E402
from fusion_bench.modelpool import ConvNextForImageClassificationPool  # noqa: E402

TASKS = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/convnext-fusion-bench"))
    parser.add_argument("--no-heads", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    # ``_pretrained_`` as a mapping: with a plain path, the pool's ``load_processor`` (called
    # by ``save_model``) fails on ``str.config_path`` in 0.2.33.
    pretrained = {"config_path": str(args.cache / "pretrained"), "pretrained": True}
    models = {"_pretrained_": pretrained, **{task: str(args.cache / task) for task in TASKS}}
    out = args.cache / "out" / ("fusionbench-no-heads" if args.no_heads else "fusionbench")
    floor = _peak_mib()
    start = time.perf_counter()
    pool = ConvNextForImageClassificationPool(models=models)
    heads = {}
    if not args.no_heads:
        for task in pool.model_names:
            for name, tensor in pool.load_model(task).classifier.state_dict().items():
                heads[f"heads.{task}.{name}"] = tensor.detach().contiguous()
    with torch.no_grad():
        merged = SimpleAverageAlgorithm().run(pool)
    pool.save_model(merged, str(out))
    if heads:
        save_file(heads, out / "heads.safetensors")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "import_floor_mib": floor, "peak_rss_mib": _peak_mib(), "vm_hwm_mib": _own_peak_mib()}))


def _own_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
