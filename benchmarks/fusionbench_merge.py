"""FusionBench's own merge flows on the checkpoints of ``benchmarks/merge_speed.py``.

    /tmp/fbvenv/bin/python benchmarks/fusionbench_merge.py --method simple_average|ties|dare_task_arithmetic|dare_ties
        --out DIR [--cache /tmp/convnext-fusion-bench] [--hyperparameters JSON] [--no-heads]

Runs in a separate venv holding ``fusion-bench==0.2.33`` (and ``torch==2.13.0``), never in
the project's: it imports nothing from this repository. ``benchmarks/merge_speed.py
--fusionbench-python /tmp/fbvenv/bin/python`` starts it in a fresh process per measurement and
reads the one JSON line it prints: ``seconds`` from building the pool to the saved model,
``peak_rss_mib`` (``ru_maxrss`` of the whole process) and ``import_floor_mib`` (the peak after
the imports, which are done before the clock starts).

``--hyperparameters`` holds the project method's own (``merge_speed.py`` passes
``method.hyperparameters()``), mapped to FusionBench's names: ``top_k`` -> ``threshold`` (the
fraction of each task vector kept), ``drop_rate`` -> ``sparsity_ratio``, ``scaling_factor`` and
``rescale`` as they are, ``seed`` seeds torch's global generator (FusionBench draws DARE's masks
from it). TIES uses ``merge_func="mean"``, the disjoint mean of the TIES paper and of ours
(FusionBench's config default is ``sum``); DARE drops on every parameter
(``only_on_linear_weights=False``), as ours does.

The flows:

* ``simple_average``, as FusionBench's configs for convnext-base-224 spell it: a
  ``ConvNextForImageClassificationPool`` over the nine local directories (plain paths, so each
  model loads with ``AutoModelForImageClassification.from_pretrained``; ``_pretrained_`` is given as
  ``{config_path, pretrained: true}`` since ``save_model`` fails on a plain path there), every task's
  head collected from its loaded model (``pool.load_model(task).classifier``; FusionBench 0.2.33 has
  no other way to reach the heads, so each model is loaded a second time), then
  ``SimpleAverageAlgorithm().run(pool)`` (it averages the ``convnext`` submodule of the eight
  fine-tuned models), then ``pool.save_model(merged, out)`` (``save_pretrained`` of the merged model
  and its image processor).
* ``ties`` (``TiesMergingAlgorithm``), ``dare_task_arithmetic`` (``DareTaskArithmetic``) and
  ``dare_ties`` (``DareTiesMerging``): in 0.2.33 only SimpleAverage honours the pool's
  ``convnext`` target module; these merge whole models, and the 1000-class pretrained head against
  the 10-class task heads stops them (a shape mismatch). So, as FusionBench's methods take any
  ``nn.Module`` pool: the nine models are loaded (``AutoModelForImageClassification``), each task's
  head is kept, a ``BaseModelPool`` of their ``convnext`` backbones is merged, and the pretrained
  classifier, whose backbone is now the merged one, is saved with ``save_pretrained``.

Every flow saves the heads into ``heads.safetensors`` beside the model; with ``--no-heads`` they
are neither collected nor saved.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an
older Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import sys
import time
import typing
from pathlib import Path

import typing_extensions

if not hasattr(typing, "override"):
    typing.override = typing_extensions.override

import torch  # noqa: E402
from fusion_bench import BaseModelPool  # noqa: E402
from fusion_bench.method import DareTaskArithmetic, DareTiesMerging, SimpleAverageAlgorithm, TiesMergingAlgorithm  # noqa: E402
from fusion_bench.modelpool import ConvNextForImageClassificationPool  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

#: The tasks of the pool (``--tasks``, from merge_speed: its checkpoints' names); the eight by default.
TASKS = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
METHODS = ("simple_average", "ties", "dare_task_arithmetic", "dare_ties")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _own_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def algorithm(method: str, hp: dict) -> object:
    """FusionBench's algorithm for ``method`` with the project's hyper-parameters ``hp``."""
    torch.manual_seed(hp.get("seed", 0))  # DARE's masks come from torch's global generator
    ties = {"threshold": hp.get("top_k"), "remove_keys": [], "merge_func": "mean"}
    dare = {"sparsity_ratio": hp.get("drop_rate"), "only_on_linear_weights": False, "rescale": hp.get("rescale", True)}
    if method == "ties":
        return TiesMergingAlgorithm(scaling_factor=hp["scaling_factor"], **ties)
    if method == "dare_task_arithmetic":
        return DareTaskArithmetic(scaling_factor=hp["scaling_factor"], **dare)
    if method == "dare_ties":
        return DareTiesMerging(scaling_factor=hp["scaling_factor"], **dare, **ties)
    return SimpleAverageAlgorithm()


def simple_average(cache: Path, out: Path, heads: bool) -> dict[str, torch.Tensor]:
    # ``_pretrained_`` as a mapping: with a plain path, the pool's ``load_processor`` (called
    # by ``save_model``) fails on ``str.config_path`` in 0.2.33.
    pretrained = {"config_path": str(cache / "pretrained"), "pretrained": True}
    pool = ConvNextForImageClassificationPool(models={"_pretrained_": pretrained, **{task: str(cache / task) for task in TASKS}})
    collected = {}
    if heads:
        for task in pool.model_names:
            for name, tensor in pool.load_model(task).classifier.state_dict().items():
                collected[f"heads.{task}.{name}"] = tensor.detach().contiguous()
    with torch.no_grad():
        merged = SimpleAverageAlgorithm().run(pool)
    pool.save_model(merged, str(out))
    return collected


def backbone_merge(method: str, hp: dict, cache: Path, out: Path, heads: bool) -> dict[str, torch.Tensor]:
    models = {"_pretrained_": AutoModelForImageClassification.from_pretrained(cache / "pretrained")}
    models.update({task: AutoModelForImageClassification.from_pretrained(cache / task) for task in TASKS})
    collected = {}
    if heads:
        for task in TASKS:
            for name, tensor in models[task].classifier.state_dict().items():
                collected[f"heads.{task}.{name}"] = tensor.detach().contiguous()
    pool = BaseModelPool({name: model.convnext for name, model in models.items()})
    with torch.no_grad(), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # a line per tensor
        merged = algorithm(method, hp).run(pool)
    pretrained = models["_pretrained_"]
    pretrained.convnext = merged  # the pretrained backbone, merged in place by FusionBench
    pretrained.save_pretrained(out)
    return collected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/convnext-fusion-bench"))
    parser.add_argument("--method", choices=METHODS, default="simple_average")
    parser.add_argument("--hyperparameters", type=json.loads, default={}, help="the project method's, as JSON")
    parser.add_argument("--out", type=Path, help="where the merged model goes (default: <cache>/out/fusionbench[-no-heads])")
    parser.add_argument("--no-heads", action="store_true")
    parser.add_argument("--tasks", help="comma-separated task names of the pool (default: the eight)")
    args = parser.parse_args()
    if args.tasks:
        TASKS[:] = args.tasks.split(",")
    logging.disable(logging.WARNING)
    out = args.out or args.cache / "out" / ("fusionbench-no-heads" if args.no_heads else "fusionbench")
    floor = _peak_mib()
    start = time.perf_counter()
    if args.method == "simple_average":
        heads = simple_average(args.cache, out, not args.no_heads)
    else:
        heads = backbone_merge(args.method, args.hyperparameters, args.cache, out, not args.no_heads)
    if heads:
        save_file(heads, out / "heads.safetensors")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "import_floor_mib": floor, "peak_rss_mib": _peak_mib(), "vm_hwm_mib": _own_peak_mib()}))


if __name__ == "__main__":
    sys.exit(main())
