"""RegMean against FusionBench 0.2.33's implementation, on tiny ConvNeXt pools.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.fusionbench_regmean --fusionbench-python /tmp/fbvenv/bin/python
        [--workdir DIR] [--tasks 2,3,8] [--ratios 0.95,0.5,0]

The oracle runs in its own venv, never in the project's:
``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install torch==2.13.0 fusion-bench==0.2.33``.

For each pool size ``T`` (``--tasks``) the project side (this venv) writes into ``--workdir`` (a
temporary folder by default) a tiny pretrained ``ConvNextForImageClassification``
(``depths=[1,1,1,1]``, ``hidden_sizes=[8,16,32,64]``, patch 2, so its ``pwconv`` inputs have 8
to 256 features), ``T`` "fine-tuned" ones (the pretrained model plus seeded Gaussian noise) and,
per task, a safetensors file of random 32x32 "preprocessed images", a different number per
task (``24 + 8 t``), so that the per-task averaging of the Grams matters. It then runs the
project's own flow: ``merging.grams.GramAccumulator`` on each fine-tuned backbone over its
task's images (batches of 8), ``mean_grams``, and ``merge_backbone(ModelPool, RegMean(a),
grams=...)``; it saves the Grams and each merged backbone as safetensors.

The FusionBench side is this same file started with ``--fusionbench-python`` as
``--fusionbench-side``: it imports nothing from the project, only the standard library, torch,
safetensors, transformers and fusion_bench, and runs two of FusionBench's RegMean functions
(``fusion_bench.method.regmean.regmean``) on the ``ConvNextModel`` backbones
(``AutoModelForImageClassification.from_pretrained(dir).convnext``):

* ``merging_with_regmean_weights`` on the same weights and *our* Grams (the closed form alone:
  FusionBench's off-diagonal shrink, ``torch.inverse``, its average of the other parameters);
* ``regmean_merging``, the whole method: its own forward hooks on every ``nn.Linear`` gather
  the Grams (its running mean over rows) on the same images in the same batches, fed through a
  minimal stand-in for the Hugging Face trainer it expects (``get_train_dataloader``,
  ``_train_batch_size``, ``_prepare_inputs``), then the same closed form.

Each runs as FusionBench runs on these float32 models, and again on the models, images and
Grams cast to float64 (FusionBench then computes in float64).

Printed: per pool, ratio and FusionBench function, the largest absolute difference between our
merged backbone and FusionBench's over the Linear weights (``pwconv``) and over the other
parameters, beside the largest ``|W*|`` for scale. It measures and prints; it asserts nothing.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an older
Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import tempfile
from pathlib import Path

TINY = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64], "patch_size": 2, "image_size": 32}
BATCH = 8


def pool_dirs(root: Path, num_tasks: int) -> dict[str, Path]:
    return {"_pretrained_": root / "pretrained", **{f"task{t}": root / f"task{t}" for t in range(num_tasks)}}


def num_images(task_index: int) -> int:
    return 24 + 8 * task_index


def ratio_label(ratio: float) -> str:
    return f"{ratio:g}"


# ---------------------------------------------------------------- project side (.venv)


def write_pool(root: Path, num_tasks: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from benchmarks.tiny_pool import write_tiny_pool

    def write_images(index: int, generator: torch.Generator) -> None:
        images = torch.randn((num_images(index), 3, 32, 32), generator=generator)
        save_file({"images": images}, str(root / f"images_task{index}.safetensors"))

    write_tiny_pool(pool_dirs(root, num_tasks), TINY, seed, after_each=write_images)


def merge_ours(root: Path, num_tasks: int, ratios: list[float], out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import ConvNextForImageClassification

    from merging.engine import merge_backbone
    from merging.grams import GramAccumulator, mean_grams
    from merging.pool import ModelPool
    from merging.regmean import RegMean

    dirs = pool_dirs(root, num_tasks)
    grams: dict[str, list[torch.Tensor]] = {}
    for index in range(num_tasks):
        accumulator = GramAccumulator(ConvNextForImageClassification.from_pretrained(dirs[f"task{index}"]).convnext.eval())
        images = load_file(str(root / f"images_task{index}.safetensors"))["images"]
        with torch.no_grad():
            for batch in images.split(BATCH):
                accumulator(batch)
        sums, rows, _ = accumulator.reduced_sums(torch.device("cpu"))
        task_grams = dict(zip(accumulator.keys, mean_grams(sums, rows, accumulator.keys, f"task{index}")))
        save_file(task_grams, str(out / f"grams_task{index}.safetensors"))
        for key, gram in task_grams.items():
            grams.setdefault(key, []).append(gram)
    for ratio in ratios:
        pool = ModelPool({name: str(path) for name, path in dirs.items()})
        merged = merge_backbone(pool, RegMean(ratio), progress=False, grams=grams)
        save_file(
            {key: tensor.contiguous() for key, tensor in merged.items()}, str(out / f"ours_{ratio_label(ratio)}.safetensors")
        )


FUNCTIONS = ("merging_with_regmean_weights", "regmean_merging")


def compare(root: Path, num_tasks: int, ratios: list[float], out: Path) -> list[dict[str, object]]:
    """Per ratio, FusionBench function and precision: the largest |ours - FusionBench| over the
    Linear weights and over the other parameters."""
    import torch
    from safetensors.torch import load_file

    rows = []
    for ratio, function, suffix in itertools.product(ratios, FUNCTIONS, ("", "_float64")):
        ours = load_file(str(out / f"ours_{ratio_label(ratio)}.safetensors"))
        theirs = load_file(str(out / f"fusionbench_{function}_{ratio_label(ratio)}{suffix}.safetensors"))
        if set(ours) != set(theirs):
            raise SystemExit(f"{function}: different keys: {sorted(set(ours) ^ set(theirs))[:5]}")
        row: dict[str, object] = {
            "ratio": ratio,
            "function": function,
            "float64": bool(suffix),
            "linear": 0.0,
            "other": 0.0,
            "scale": 0.0,
        }
        for key, tensor in ours.items():
            if not torch.isfinite(theirs[key]).all():
                raise SystemExit(f"{function}: FusionBench's '{key}' is not finite")
            column = "linear" if key.endswith(("pwconv1.weight", "pwconv2.weight")) else "other"
            row[column] = max(row[column], float((tensor.double() - theirs[key].double()).abs().max()))
            if column == "linear":
                row["scale"] = max(row["scale"], float(tensor.abs().max()))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fusionbench-python", default="/tmp/fbvenv/bin/python", help="python of a venv with fusion-bench==0.2.33"
    )
    parser.add_argument("--workdir", type=Path, help="where pools and merges are written (default: a temporary folder)")
    parser.add_argument("--tasks", default="2,3,8", help="pool sizes T, comma-separated")
    parser.add_argument("--ratios", default="0.95,0.5,0", help="reduce_non_diagonal_ratio values, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fusionbench-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(t) for t in args.tasks.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.fusionbench_side:
        for num_tasks in sizes:
            root = args.workdir / f"T{num_tasks}"
            merge_fusionbench(root, num_tasks, ratios, root / "merged")
        return
    with tempfile.TemporaryDirectory(prefix="fusionbench-regmean-") as scratch:
        workdir = args.workdir or Path(scratch)
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            (root / "merged").mkdir(parents=True, exist_ok=True)
            write_pool(root, num_tasks, args.seed + num_tasks)
            merge_ours(root, num_tasks, ratios, root / "merged")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        command = [args.fusionbench_python, str(Path(__file__).resolve()), "--fusionbench-side", "--workdir", str(workdir),
                   "--tasks", args.tasks, "--ratios", args.ratios]  # fmt: skip
        done = subprocess.run(command, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the FusionBench side failed:\n{done.stderr[-4000:]}")
        report(workdir, sizes, ratios)


def report(workdir: Path, sizes: list[int], ratios: list[float]) -> None:
    from benchmarks import tiny_pool

    print(
        f"largest |ours - FusionBench 0.2.33| of the merged backbones (tiny ConvNeXt {TINY['hidden_sizes']}, noise {tiny_pool.NOISE})"
    )
    print(
        f"{'T':>3s} {'ratio':>6s} {'FusionBench function':30s} {'precision':>9s} {'pwconv weights':>15s} {'other':>10s} {'max |W*|':>9s}"
    )
    worst: dict[tuple[str, bool], float] = {}
    for num_tasks in sizes:
        root = workdir / f"T{num_tasks}"
        for row in compare(root, num_tasks, ratios, root / "merged"):
            precision = "float64" if row["float64"] else "float32"
            print(
                f"{num_tasks:3d} {row['ratio']:6g} {row['function']:30s} {precision:>9s} "
                f"{row['linear']:15.2e} {row['other']:10.2e} {row['scale']:9.3f}"
            )
            key = (str(row["function"]), bool(row["float64"]))
            worst[key] = max(worst.get(key, 0.0), float(row["linear"]), float(row["other"]))
    print("largest difference overall:")
    for (function, float64), value in worst.items():
        print(f"  {function:30s} {'float64' if float64 else 'float32 (as it runs)':20s} {value:.2e}")


# ---------------------------------------------------------------- FusionBench side (/tmp/fbvenv)


class _Trainer:
    """What ``regmean_merging`` asks of a Hugging Face trainer: the batches and their size."""

    def __init__(self, images, batch_size: int) -> None:
        self._train_batch_size = batch_size
        self.batches = [{"pixel_values": batch} for batch in images.split(batch_size)]

    def get_train_dataloader(self):
        return self.batches

    def _prepare_inputs(self, inputs):
        return inputs


def merge_fusionbench(root: Path, num_tasks: int, ratios: list[float], out: Path) -> None:
    """FusionBench's RegMean on the pool's backbones; imports nothing from the project."""
    import contextlib
    import logging
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
    logging.disable(logging.WARNING)

    import torch
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights, regmean_merging
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageClassification

    dirs = pool_dirs(root, num_tasks)
    names = [f"task{index}" for index in range(num_tasks)]

    def backbones(dtype: torch.dtype) -> list[torch.nn.Module]:
        return [AutoModelForImageClassification.from_pretrained(dirs[name]).convnext.to(dtype).eval() for name in names]

    def save(state: dict[str, torch.Tensor], function: str, ratio: float, suffix: str) -> None:
        tensors = {f"convnext.{key}": tensor.detach().to(torch.float32).contiguous() for key, tensor in state.items()}
        save_file(tensors, str(out / f"fusionbench_{function}_{ratio_label(ratio)}{suffix}.safetensors"))

    images = [load_file(str(root / f"images_task{index}.safetensors"))["images"] for index in range(num_tasks)]
    grams = [load_file(str(out / f"grams_task{index}.safetensors")) for index in range(num_tasks)]
    for ratio, (suffix, dtype) in itertools.product(ratios, [("", torch.float32), ("_float64", torch.float64)]):
        models = backbones(dtype)
        params = {key: [dict(model.named_parameters())[key] for model in models] for key, _ in models[0].named_parameters()}
        # FusionBench keys its Grams by module name: "encoder.stages.0.layers.0.pwconv1".
        module_grams = [
            {key.removeprefix("convnext.").removesuffix(".weight"): g.to(dtype) for key, g in task.items()} for task in grams
        ]
        with torch.no_grad():
            merged = merging_with_regmean_weights(params, module_grams, reduce_non_diagonal_ratio=ratio)
        save(merged, "merging_with_regmean_weights", ratio, suffix)
        trainers = [_Trainer(task_images.to(dtype), BATCH) for task_images in images]
        with torch.no_grad(), contextlib.redirect_stdout(open(os.devnull, "w")):  # it prints a warning per model
            merged = regmean_merging(backbones(dtype), trainers, [], [len(task_images) for task_images in images], ratio)
        save(merged, "regmean_merging", ratio, suffix)


if __name__ == "__main__":
    main()
