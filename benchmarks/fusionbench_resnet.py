"""Simple average, task arithmetic and TIES on a ResNet pool, against FusionBench 0.2.33.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.fusionbench_resnet --fusionbench-python /tmp/fbvenv/bin/python
        [--workdir DIR] [--tasks 2,3,8] [--per-tensor]

The oracle runs in its own venv, never in the project's:
``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install torch==2.13.0 fusion-bench==0.2.33``.

For each pool size ``T`` (``--tasks``) the project side (this venv) writes a pool into
``--workdir`` (a temporary folder by default): a tiny pretrained ``ResNetForImageClassification``
(ResNet-50's bottleneck blocks, ``hidden_sizes=[32, 64, 128, 256]``, one block per stage, BatchNorm
running statistics drawn away from 0 and 1 and counters at 1000, as a trained model has them) and
``T`` "fine-tuned" copies: seeded Gaussian noise (``NOISE``) on every floating-point tensor (a
running variance scaled by ``exp`` of it, so it stays positive), each counter advanced by the
fine-tune's steps (100 x (t + 1)), all with 10-class heads. It merges the backbones with
``SimpleAverage``, ``TaskArithmetic`` and ``TiesMerging`` through ``ModelPool`` and
``merge_backbone`` (the flow ``merge.py`` runs) and saves each result as safetensors.

The FusionBench side is this same file started with ``--fusionbench-python`` as
``--fusionbench-side``: it imports nothing from the project, reads the pool's directories and
runs, on CPU:

- ``SimpleAverageAlgorithm`` on FusionBench's own ``ResNetForImageClassificationPool``
  (``type="transformers"``, the plain directories) and on a ``BaseModelPool`` of the ``ResNetModel``
  backbones (``AutoModelForImageClassification.from_pretrained(dir).resnet``; FusionBench's methods
  take any ``nn.Module`` pool);
- ``TaskArithmeticAlgorithm(scaling_factor)`` and ``TiesMergingAlgorithm(scaling_factor, threshold=top_k,
  remove_keys=[], merge_func="mean")`` (the disjoint mean of the TIES paper and of ours) on the
  backbones' pool, as they run: on the whole ``state_dict``, BatchNorm's integer counters included;
- its TIES functions (``state_dict_to_vector``, ``ties_merging``, ``vector_to_state_dict``) on the
  floating-point tensors alone (``remove_keys`` = the counters), the set ours merges;

each on the float32 models as they are and on the same models cast to float64, and saves the
merged backbones.

Printed: per method and pool, the largest absolute difference between our merged backbone and
FusionBench's over the convolution kernels (4-D), BatchNorm's weights and biases, and its running
means and variances, beside the largest ``|theta - theta_0|`` for scale; then what each side makes
of the counters (ours keeps the pretrained model's, which no eval-mode forward reads; FusionBench
merges them as numbers and casts back to int64). ``--per-tensor`` prints every backbone tensor's
difference too. It measures and prints; it asserts nothing.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an older
Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

NOISE = 0.05
TINY = {
    "embedding_size": 16,
    "hidden_sizes": [32, 64, 128, 256],
    "depths": [1, 1, 1, 1],
    "layer_type": "bottleneck",
    "num_labels": 10,
}
#: (label, our class in merging, its hyper-parameters as ours name them)
METHODS = [
    ("simple_average", "SimpleAverage", {}),
    ("task_arithmetic_0.3", "TaskArithmetic", {"scaling_factor": 0.3}),
    ("task_arithmetic_1.0", "TaskArithmetic", {"scaling_factor": 1.0}),
    ("ties_0.2_0.3", "TiesMerging", {"top_k": 0.2, "scaling_factor": 0.3}),
    ("ties_0.5_1.0", "TiesMerging", {"top_k": 0.5, "scaling_factor": 1.0}),
]
#: FusionBench's runs of each method: (suffix, what it is)
FLOWS = {
    "SimpleAverage": [("", "SimpleAverageAlgorithm, backbones"), ("_pool", "SimpleAverageAlgorithm, ResNetForImageClassificationPool")],
    "TaskArithmetic": [("", "TaskArithmeticAlgorithm, backbones, the fine-tunes' counters set to the pretrained's")],
    "TiesMerging": [("", "TiesMergingAlgorithm, backbones (counters in its top-k)"), ("_floats", "its TIES functions, floating-point tensors only")],
}  # fmt: skip
GROUPS = ("conv", "bn_affine", "bn_stats")


def pool_dirs(root: Path, num_tasks: int) -> dict[str, Path]:
    return {"_pretrained_": root / "pretrained", **{f"task{t}": root / f"task{t}" for t in range(num_tasks)}}


def group_of(key: str, ndim: int) -> str:
    if key.endswith("num_batches_tracked"):
        return "counter"
    if key.endswith(("running_mean", "running_var")):
        return "bn_stats"
    return "conv" if ndim == 4 else "bn_affine"


# ---------------------------------------------------------------- project side (.venv)


def write_pool(root: Path, num_tasks: int, seed: int) -> None:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.utils import logging

    logging.disable_progress_bar()
    dirs = pool_dirs(root, num_tasks)
    torch.manual_seed(seed)
    pretrained = ResNetForImageClassification(ResNetConfig(**TINY))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in pretrained.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(1000)
    pretrained.save_pretrained(dirs["_pretrained_"])
    for index, directory in enumerate(path for name, path in dirs.items() if name != "_pretrained_"):
        state = {}
        for key, tensor in pretrained.state_dict().items():
            if not tensor.is_floating_point():
                state[key] = tensor + 100 * (index + 1)
            elif key.endswith("running_var"):
                state[key] = tensor * torch.exp(NOISE * torch.randn(tensor.shape, generator=generator))
            else:
                state[key] = tensor + NOISE * torch.randn(tensor.shape, generator=generator)
        model = ResNetForImageClassification(ResNetConfig(**TINY))
        model.load_state_dict(state)
        model.save_pretrained(directory)


def merge_ours(root: Path, num_tasks: int, out: Path) -> None:
    from safetensors.torch import save_file

    import merging
    from merging.engine import merge_backbone
    from merging.pool import ModelPool

    for label, cls, params in METHODS:
        pool = ModelPool({name: str(path) for name, path in pool_dirs(root, num_tasks).items()})
        merged = merge_backbone(pool, getattr(merging, cls)(**params), progress=False)
        save_file({key: tensor.contiguous() for key, tensor in merged.items()}, str(out / f"ours_{label}.safetensors"))


def compare(root: Path, num_tasks: int, out: Path, per_tensor: bool) -> dict[str, dict[str, float]]:
    """Per method and FusionBench run: the largest |ours - FusionBench| per tensor group, as it
    runs and on float64 models, and the counters both sides give."""
    import torch
    from safetensors.torch import load_file

    pretrained = load_file(str(pool_dirs(root, num_tasks)["_pretrained_"] / "model.safetensors"))
    results: dict[str, dict[str, float]] = {}
    for label, cls, _ in METHODS:
        ours = load_file(str(out / f"ours_{label}.safetensors"))
        for suffix, _ in FLOWS[cls]:
            row: dict[str, float] = {"update": 0.0}
            for precision in ("", "_float64"):
                theirs = load_file(str(out / f"fusionbench_{label}{suffix}{precision}.safetensors"))
                if set(ours) != set(theirs):
                    raise SystemExit(f"{label}{suffix}: different keys: {sorted(set(ours) ^ set(theirs))}")
                for key, tensor in ours.items():
                    group = group_of(key, tensor.ndim)
                    if group == "counter":
                        row[f"counter_ours{precision}"] = float(tensor.flatten()[0])
                        row[f"counter_fusionbench{precision}"] = float(theirs[key].flatten()[0])
                        row["counter_pretrained"] = float(pretrained[key].flatten()[0])
                        continue
                    if not torch.isfinite(theirs[key]).all():
                        raise SystemExit(f"{label}{suffix}: FusionBench's '{key}' is not finite")
                    difference = float((tensor.double() - theirs[key].double()).abs().max())
                    row[group + precision] = max(row.get(group + precision, 0.0), difference)
                    row["update"] = max(row["update"], float((tensor - pretrained[key]).abs().max()))
                    if per_tensor:
                        print(f"  T={num_tasks} {label}{suffix}{precision} {key}: {difference:.2e}")
            results[f"{label}{suffix}"] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fusionbench-python", default="/tmp/fbvenv/bin/python", help="python of a venv with fusion-bench==0.2.33"
    )
    parser.add_argument("--workdir", type=Path, help="where pools and merges are written (default: a temporary folder)")
    parser.add_argument("--tasks", default="2,3,8", help="pool sizes T, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-tensor", action="store_true", help="print every backbone tensor's difference")
    parser.add_argument("--fusionbench-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(t) for t in args.tasks.split(",")]
    if args.fusionbench_side:
        for num_tasks in sizes:
            merge_fusionbench(args.workdir / f"T{num_tasks}", num_tasks, args.workdir / f"T{num_tasks}" / "merged")
        return
    with tempfile.TemporaryDirectory(prefix="fusionbench-resnet-") as scratch:
        workdir = args.workdir or Path(scratch)
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            (root / "merged").mkdir(parents=True, exist_ok=True)
            write_pool(root, num_tasks, args.seed + num_tasks)
            merge_ours(root, num_tasks, root / "merged")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        command = [args.fusionbench_python, str(Path(__file__).resolve()), "--fusionbench-side", "--workdir", str(workdir)]
        done = subprocess.run(
            [*command, "--tasks", args.tasks], cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"the FusionBench side failed:\n{done.stderr[-4000:]}")
        report(workdir, sizes, args.per_tensor)


def report(workdir: Path, sizes: list[int], per_tensor: bool) -> None:
    print(
        f"largest |ours - FusionBench 0.2.33| of the merged backbones (tiny ResNet, bottleneck {TINY['hidden_sizes']}, noise {NOISE})"
    )
    print(f"{'':28s} {'FusionBench as it runs':^38s}  {'FusionBench on float64':^38s}")
    header = "".join(f" {group:>12s}" for group in GROUPS)
    print(f"{'method':24s} {'T':>3s}{header}  {header}  {'max |theta - theta_0|':>22s}")
    overall: dict[str, list[float]] = {}
    counters: dict[str, str] = {}
    for num_tasks in sizes:
        root = workdir / f"T{num_tasks}"
        for name, row in compare(root, num_tasks, root / "merged", per_tensor).items():
            as_it_runs = "".join(f" {row[group]:12.2e}" for group in GROUPS)
            on_float64 = "".join(f" {row[group + '_float64']:12.2e}" for group in GROUPS)
            print(f"{name:24s} {num_tasks:3d}{as_it_runs}  {on_float64}  {row['update']:22.3f}")
            worst = overall.setdefault(name, [0.0, 0.0])
            worst[0] = max(worst[0], *(row[group] for group in GROUPS))
            worst[1] = max(worst[1], *(row[group + "_float64"] for group in GROUPS))
            counters[f"{name} T={num_tasks}"] = (
                f"pretrained {row['counter_pretrained']:.0f}, ours {row['counter_ours']:.0f}, "
                f"FusionBench {row['counter_fusionbench']:.0f}"
            )
    print("largest difference over every floating-point backbone tensor (FusionBench as it runs / on float64):")
    for name, (as_it_runs, on_float64) in overall.items():
        print(f"  {name:24s} {as_it_runs:.2e} / {on_float64:.2e}")
    refused = {}
    for num_tasks in sizes:
        for name, message in json.loads((workdir / f"T{num_tasks}" / "merged" / "fusionbench_refusals.json").read_text()).items():
            refused.setdefault(message, []).append(f"{name} T={num_tasks}")
    for message, runs in refused.items():
        print(f"FusionBench refused {len(runs)} runs on the backbones as they are ({runs[0]}, ...): {message}")
    print("the first BatchNorm's num_batches_tracked (fine-tune t advanced it by 100 (t + 1)):")
    for name, line in counters.items():
        print(f"  {name:30s} {line}")


# ---------------------------------------------------------------- FusionBench side (/tmp/fbvenv)


def merge_fusionbench(root: Path, num_tasks: int, out: Path) -> None:
    """FusionBench's methods on the pool; imports nothing from the project."""
    import contextlib
    import logging
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
    logging.disable(logging.WARNING)

    import torch
    from fusion_bench import BaseModelPool
    from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
    from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector, ties_merging, vector_to_state_dict
    from fusion_bench.modelpool import ResNetForImageClassificationPool
    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification

    dirs = pool_dirs(root, num_tasks)

    def backbones(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
        # Fresh modules for every run: FusionBench writes the result into one of them.
        return {name: AutoModelForImageClassification.from_pretrained(path).resnet.to(dtype) for name, path in dirs.items()}

    def whole_pool(dtype: torch.dtype) -> ResNetForImageClassificationPool:
        pool = ResNetForImageClassificationPool(models={name: str(path) for name, path in dirs.items()}, type="transformers")
        if dtype == torch.float32:
            return pool
        models = {name: pool.load_model(name).to(dtype) for name in pool.all_model_names}
        return BaseModelPool(models)

    def ties_on_floats(models: dict[str, torch.nn.Module], top_k: float, scaling_factor: float) -> dict[str, torch.Tensor]:
        pretrained = models["_pretrained_"].state_dict()
        counters = [key for key, tensor in pretrained.items() if not tensor.is_floating_point()]
        flat_ptm = state_dict_to_vector(pretrained, counters)
        flat_ft = torch.vstack(
            [state_dict_to_vector(m.state_dict(), counters) for name, m in models.items() if name != "_pretrained_"]
        )
        merged = flat_ptm + scaling_factor * ties_merging(flat_ft - flat_ptm, reset_thresh=top_k, merge_func="mean")
        state = dict(vector_to_state_dict(merged, pretrained, remove_keys=counters))
        state.update({key: pretrained[key] for key in counters})  # as ours keeps them
        return state

    def same_counters(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
        """The fine-tunes with BatchNorm's counters set to the pretrained model's (what ours keeps)."""
        pretrained = models["_pretrained_"].state_dict()
        for model in models.values():
            for key, tensor in model.state_dict().items():
                if not tensor.is_floating_point():
                    tensor.copy_(pretrained[key])
        return models

    refusals: dict[str, str] = {}

    def save(state: dict[str, torch.Tensor], name: str) -> None:
        tensors = {f"resnet.{key}": tensor.detach().contiguous() for key, tensor in state.items()}
        save_file(tensors, str(out / f"fusionbench_{name}.safetensors"))

    for label, cls, params in METHODS:
        for precision, dtype in (("", torch.float32), ("_float64", torch.float64)):
            with torch.no_grad(), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # a line per model
                if cls == "SimpleAverage":
                    save(SimpleAverageAlgorithm().run(BaseModelPool(backbones(dtype))).state_dict(), f"{label}{precision}")
                    merged = SimpleAverageAlgorithm().run(whole_pool(dtype))
                    state = {
                        key.removeprefix("resnet."): t for key, t in merged.state_dict().items() if key.startswith("resnet.")
                    }
                    save(state, f"{label}_pool{precision}")
                elif cls == "TaskArithmetic":
                    algorithm = TaskArithmeticAlgorithm(scaling_factor=params["scaling_factor"])
                    try:
                        algorithm.run(BaseModelPool(backbones(dtype)))
                    except ValueError as error:  # the counters' scaled task vector is a float: refused
                        refusals[f"{label}{precision}"] = " ".join(str(error).split())
                    save(algorithm.run(BaseModelPool(same_counters(backbones(dtype)))).state_dict(), f"{label}{precision}")
                else:
                    algorithm = TiesMergingAlgorithm(
                        scaling_factor=params["scaling_factor"], threshold=params["top_k"], remove_keys=[], merge_func="mean"
                    )
                    save(algorithm.run(BaseModelPool(backbones(dtype))).state_dict(), f"{label}{precision}")
                    save(
                        ties_on_floats(backbones(dtype), params["top_k"], params["scaling_factor"]), f"{label}_floats{precision}"
                    )
    (out / "fusionbench_refusals.json").write_text(json.dumps(refusals))


if __name__ == "__main__":
    main()
