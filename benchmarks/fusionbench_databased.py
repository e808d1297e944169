"""The data-based methods FusionBench 0.2.33 has beside RegMean (Fisher merging, RegMean++) against its
implementations, on tiny ConvNeXt pools.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.fusionbench_databased --fusionbench-python /tmp/fbvenv/bin/python
        [--workdir DIR] [--tasks 2,3,8] [--methods fisher_merging,regmean_plusplus]

The oracle runs in its own venv, never in the project's:
``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install torch==2.13.0 fusion-bench==0.2.33``.

As ``benchmarks/fusionbench_regmean.py``: for each pool size ``T`` (``--tasks``) the project side
(this venv) writes into ``--workdir`` (a temporary folder by default) a tiny pool
(``benchmarks.tiny_pool``: a pretrained ``ConvNextForImageClassification`` with
``depths=[1,1,1,1]``, ``hidden_sizes=[8,16,32,64]``, patch 2, 32x32 inputs, and ``T`` copies
with seeded Gaussian noise on every tensor, their heads too) and, per task, a safetensors file
of random "preprocessed images", ``24 + 8 t`` of them, so that each task's Fisher is a mean
over a different number of images. It then runs the project's own flow and saves the result,
on the float32 models and again on the models and images cast to float64:

* Fisher merging: ``merging.fisher.FisherAccumulator`` on each fine-tuned classifier (its
  backbone and its own head) over its task's images, in batches of 8, ``mean_fishers``, and
  ``merge_backbone(ModelPool, FisherMerging(...), fishers=...)``, with ``normalize_fisher_weight``
  true and false (``minimal_fisher_weight`` 1e-6, FusionBench's default). Its Fishers are saved too.
* RegMean++: ``merge_backbone(ModelPool, RegMeanPlusPlus(a), images=ImageBatches(...))`` on the same
  images in the same batches, ``reduce_non_diagonal_ratio`` ``a`` 0.95, 0.5 and 0.

The FusionBench side is this same file started with ``--fusionbench-python`` as
``--fusionbench-side``: it imports nothing from the project, only the standard library, torch,
safetensors, transformers and fusion_bench, and runs, on the same models and images:

* ``merging_with_fisher_weights`` (``fusion_bench.method.fisher_merging.fisher_merging``) on our
  Fishers and the backbones' parameters: the merge alone (the ``+ e``, the norms, the ratio);
* ``fisher_merging``, the whole method on the ``ConvNextForImageClassification`` models: its own
  squared gradients of ``sum_c sqrt(p_c) log p_c`` (``exclude_param_names_regex`` drops the heads,
  which this project does not merge and which differ in shape on a real pool), fed through a
  minimal stand-in for the Hugging Face trainer it expects (``get_train_dataloader``,
  ``_train_batch_size``, ``_prepare_inputs``), in batches of 1: its estimator at batch size 1,
  which is ours (one squared gradient per image);
* the same in batches of 8, its own batch-level estimator (the gradient of a batch's sum,
  squared): not the same statistic, printed to show by how much it moves the merge;
* ``RegMeanAlgorithmPlusPlus.run``, FusionBench's loop (the embedding merge, each fine-tuned layer's
  Grams on the merged layers' outputs, the merge of the layer, its forward for the next), with what its
  CLIP subclass supplies written for ConvNeXt by this script: the "layers" are the blocks
  (``encoder.stages.<s>.layers.<j>``), the tensors outside them (embeddings, downsampling layers, final
  norm) are averaged up front (the CLIP subclass averages the embeddings and leaves ``post_layernorm``
  at the pretrained model's), the merged downsampling layer runs between the last block of a stage and
  the first of the next, and the Grams are the CLIP subclass's own ``get_regmean_weights`` (its hooks).

Printed: per pool, setting and FusionBench function, the largest absolute difference between our
merged backbone and FusionBench's over every backbone tensor, beside the largest
``|merged - simple average|`` (how far the Fisher weighting moves the merge) for scale. It measures
and prints; it asserts nothing.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an older
Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import subprocess
import tempfile
from pathlib import Path

TINY = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64], "patch_size": 2, "image_size": 32}
BATCH = 8
MINIMAL_FISHER_WEIGHT = 1e-6
NORMALIZE = (True, False)
PRECISIONS = ("float32", "float64")
RATIOS = (0.95, 0.5, 0.0)
METHODS = ("fisher_merging", "regmean_plusplus")


def pool_dirs(root: Path, num_tasks: int) -> dict[str, Path]:
    return {"_pretrained_": root / "pretrained", **{f"task{t}": root / f"task{t}" for t in range(num_tasks)}}


def num_images(task_index: int) -> int:
    return 24 + 8 * task_index


def fisher_label(normalize: bool, precision: str) -> str:
    return f"fisher_{'normalized' if normalize else 'plain'}_{precision}"


# ---------------------------------------------------------------- project side (.venv)


def write_pool(root: Path, num_tasks: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from benchmarks.tiny_pool import write_tiny_pool

    def write_images(index: int, generator: torch.Generator) -> None:
        images = torch.randn((num_images(index), 3, 32, 32), generator=generator)
        save_file({"images": images}, str(root / f"images_task{index}.safetensors"))

    write_tiny_pool(pool_dirs(root, num_tasks), TINY, seed, after_each=write_images)


def merge_ours_fisher(root: Path, num_tasks: int, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import ConvNextForImageClassification

    from merging.engine import merge_backbone
    from merging.fisher import FisherAccumulator, mean_fishers
    from merging.fisher_merging import FisherMerging
    from merging.pool import ModelPool

    dirs = pool_dirs(root, num_tasks)
    for precision in PRECISIONS:
        dtype = getattr(torch, precision)
        fishers: dict[str, list[torch.Tensor]] = {}
        for index in range(num_tasks):
            model = ConvNextForImageClassification.from_pretrained(dirs[f"task{index}"]).eval().to(dtype)
            accumulator = FisherAccumulator(model.convnext.requires_grad_(False), model.classifier)
            images = load_file(str(root / f"images_task{index}.safetensors"))["images"].to(dtype)
            for batch in images.split(BATCH):
                accumulator(batch)
            sums, count = accumulator.reduced_sums(torch.device("cpu"))
            task_fishers = dict(zip(accumulator.keys, mean_fishers(sums, count, f"task{index}")))
            save_file(task_fishers, str(out / f"fishers_task{index}_{precision}.safetensors"))
            for key, fisher in task_fishers.items():
                fishers.setdefault(key, []).append(fisher)
        for normalize in NORMALIZE:
            pool = ModelPool({name: str(path) for name, path in dirs.items()})
            method = FisherMerging(normalize_fisher_weight=normalize, minimal_fisher_weight=MINIMAL_FISHER_WEIGHT)
            merged = merge_backbone(pool, method, progress=False, fishers=fishers)
            label = fisher_label(normalize, precision)
            save_file({key: tensor.contiguous() for key, tensor in merged.items()}, str(out / f"ours_{label}.safetensors"))


def merge_ours_regmean_plusplus(root: Path, num_tasks: int, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from merging.engine import merge_backbone
    from merging.pool import ModelPool
    from merging.regmean_plusplus import ImageBatches, RegMeanPlusPlus

    dirs = pool_dirs(root, num_tasks)
    for ratio, precision in itertools.product(RATIOS, PRECISIONS):
        dtype = getattr(torch, precision)
        batches = {
            f"task{index}": list(load_file(str(root / f"images_task{index}.safetensors"))["images"].to(dtype).split(BATCH))
            for index in range(num_tasks)
        }
        pool = ModelPool({name: str(path) for name, path in dirs.items()})
        images = ImageBatches(batches, torch.device("cpu"), dtype)
        merged = merge_backbone(pool, RegMeanPlusPlus(ratio), progress=False, images=images)
        label = f"regmean_plusplus_{ratio:g}_{precision}"
        save_file({key: tensor.contiguous() for key, tensor in merged.items()}, str(out / f"ours_{label}.safetensors"))


FISHER_FUNCTIONS = ("merging_with_fisher_weights", "fisher_merging (batch 1)", "fisher_merging (batch 8)")


def file_name(function: str) -> str:
    return function.replace(" ", "_").replace("(", "").replace(")", "")


def simple_average(root: Path, num_tasks: int) -> dict:
    from safetensors.torch import load_file

    states = [
        load_file(str(path / "model.safetensors")) for name, path in pool_dirs(root, num_tasks).items() if name != "_pretrained_"
    ]
    return {key: sum(state[key].double() for state in states) / num_tasks for key in states[0] if key.startswith("convnext.")}


def compare(root: Path, num_tasks: int, out: Path) -> list[dict[str, object]]:
    """Per setting, FusionBench function and precision: the largest |ours - FusionBench| over the
    backbone, and the largest |ours - simple average|."""
    import torch
    from safetensors.torch import load_file

    average = simple_average(root, num_tasks)
    rows = []
    for normalize, function, precision in itertools.product(NORMALIZE, FISHER_FUNCTIONS, PRECISIONS):
        label = fisher_label(normalize, precision)
        ours = load_file(str(out / f"ours_{label}.safetensors"))
        theirs = load_file(str(out / f"fusionbench_{file_name(function)}_{label}.safetensors"))
        if set(ours) != set(theirs):
            raise SystemExit(f"{function}: different keys: {sorted(set(ours) ^ set(theirs))[:5]}")
        difference = moved = 0.0
        for key, tensor in ours.items():
            if not torch.isfinite(theirs[key]).all():
                raise SystemExit(f"{function}: FusionBench's '{key}' is not finite")
            difference = max(difference, float((tensor.double() - theirs[key].double()).abs().max()))
            moved = max(moved, float((tensor.double() - average[key]).abs().max()))
        rows.append(
            {"normalize": normalize, "function": function, "precision": precision, "difference": difference, "moved": moved}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fusionbench-python", default="/tmp/fbvenv/bin/python", help="python of a venv with fusion-bench==0.2.33"
    )
    parser.add_argument("--workdir", type=Path, help="where pools and merges are written (default: a temporary folder)")
    parser.add_argument("--tasks", default="2,3,8", help="pool sizes T, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fusionbench-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(t) for t in args.tasks.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}: choose from {list(METHODS)}")
    if args.fusionbench_side:
        for num_tasks in sizes:
            root = args.workdir / f"T{num_tasks}"
            if "fisher_merging" in methods:
                merge_fusionbench_fisher(root, num_tasks, root / "merged")
            if "regmean_plusplus" in methods:
                merge_fusionbench_regmean_plusplus(root, num_tasks, root / "merged")
        return
    with tempfile.TemporaryDirectory(prefix="fusionbench-databased-") as scratch:
        workdir = args.workdir or Path(scratch)
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            (root / "merged").mkdir(parents=True, exist_ok=True)
            write_pool(root, num_tasks, args.seed + num_tasks)
            if "fisher_merging" in methods:
                merge_ours_fisher(root, num_tasks, root / "merged")
            if "regmean_plusplus" in methods:
                merge_ours_regmean_plusplus(root, num_tasks, root / "merged")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        command = [args.fusionbench_python, str(Path(__file__).resolve()), "--fusionbench-side", "--workdir", str(workdir),
                   "--tasks", args.tasks, "--methods", args.methods]  # fmt: skip
        done = subprocess.run(command, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the FusionBench side failed:\n{done.stderr[-4000:]}")
        if "fisher_merging" in methods:
            report_fisher(workdir, sizes)
        if "regmean_plusplus" in methods:
            report_regmean_plusplus(workdir, sizes)


def report_regmean_plusplus(workdir: Path, sizes: list[int]) -> None:
    import torch
    from safetensors.torch import load_file

    from benchmarks import tiny_pool

    print(
        f"RegMean++: largest |ours - FusionBench 0.2.33| of the merged backbones (tiny ConvNeXt {TINY['hidden_sizes']}, "
        f"noise {tiny_pool.NOISE}), over the pwconv weights and the other tensors, beside the largest |W*|"
    )
    print(f"{'T':>3s} {'ratio':>6s} {'precision':>9s} {'pwconv weights':>15s} {'other':>10s} {'max |W*|':>9s}")
    worst: dict[str, float] = {}
    for num_tasks, ratio, precision in itertools.product(sizes, RATIOS, PRECISIONS):
        out = workdir / f"T{num_tasks}" / "merged"
        label = f"regmean_plusplus_{ratio:g}_{precision}"
        ours = load_file(str(out / f"ours_{label}.safetensors"))
        theirs = load_file(str(out / f"fusionbench_{label}.safetensors"))
        if set(ours) != set(theirs):
            raise SystemExit(f"RegMean++: different keys: {sorted(set(ours) ^ set(theirs))[:5]}")
        linear = other = scale = 0.0
        for key, tensor in ours.items():
            if not torch.isfinite(theirs[key]).all():
                raise SystemExit(f"RegMean++: FusionBench's '{key}' is not finite")
            difference = float((tensor.double() - theirs[key].double()).abs().max())
            if key.endswith(("pwconv1.weight", "pwconv2.weight")):
                linear, scale = max(linear, difference), max(scale, float(tensor.abs().max()))
            else:
                other = max(other, difference)
        print(f"{num_tasks:3d} {ratio:6g} {precision:>9s} {linear:15.2e} {other:10.2e} {scale:9.3f}")
        worst[precision] = max(worst.get(precision, 0.0), linear, other)
    print("largest difference overall:")
    for precision, value in worst.items():
        print(f"  {precision:8s} {value:.2e}")


def report_fisher(workdir: Path, sizes: list[int]) -> None:
    from benchmarks import tiny_pool

    print(
        f"Fisher merging: largest |ours - FusionBench 0.2.33| of the merged backbones (tiny ConvNeXt "
        f"{TINY['hidden_sizes']}, noise {tiny_pool.NOISE}, minimal_fisher_weight {MINIMAL_FISHER_WEIGHT:g})"
    )
    print(
        f"{'T':>3s} {'normalize':>9s} {'FusionBench function':28s} {'precision':>9s} {'difference':>11s} {'max |merged - average|':>23s}"
    )
    worst: dict[tuple[str, str], float] = {}
    for num_tasks in sizes:
        root = workdir / f"T{num_tasks}"
        for row in compare(root, num_tasks, root / "merged"):
            print(
                f"{num_tasks:3d} {row['normalize']!s:>9s} {row['function']:28s} {row['precision']:>9s} "
                f"{row['difference']:11.2e} {row['moved']:23.2e}"
            )
            key = (str(row["function"]), str(row["precision"]))
            worst[key] = max(worst.get(key, 0.0), float(row["difference"]))
    print("largest difference overall:")
    for (function, precision), value in worst.items():
        print(f"  {function:28s} {precision:8s} {value:.2e}")


# ---------------------------------------------------------------- FusionBench side (/tmp/fbvenv)


class _Trainer:
    """What FusionBench's ``fisher_merging`` asks of a Hugging Face trainer: the batches and their size."""

    def __init__(self, images, batch_size: int) -> None:
        self._train_batch_size = batch_size
        self.batches = [{"pixel_values": batch} for batch in images.split(batch_size)]

    def get_train_dataloader(self):
        return self.batches

    def _prepare_inputs(self, inputs):
        return inputs


def _import_fusionbench() -> None:
    import logging
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
    logging.disable(logging.WARNING)


def merge_fusionbench_fisher(root: Path, num_tasks: int, out: Path) -> None:
    """FusionBench's Fisher merging on the pool's classifiers; imports nothing from the project."""
    _import_fusionbench()
    import torch
    from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging, merging_with_fisher_weights
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageClassification

    dirs = pool_dirs(root, num_tasks)
    names = [f"task{index}" for index in range(num_tasks)]
    images = [load_file(str(root / f"images_task{index}.safetensors"))["images"] for index in range(num_tasks)]

    def classifiers(dtype: torch.dtype) -> list[torch.nn.Module]:
        return [AutoModelForImageClassification.from_pretrained(dirs[name]).to(dtype).eval() for name in names]

    def save(state: dict[str, torch.Tensor], function: str, label: str) -> None:
        tensors = {key: tensor.detach().to(torch.float32).contiguous() for key, tensor in state.items()}
        save_file(tensors, str(out / f"fusionbench_{file_name(function)}_{label}.safetensors"))

    for normalize, precision in itertools.product(NORMALIZE, PRECISIONS):
        dtype = getattr(torch, precision)
        label = fisher_label(normalize, precision)
        models = classifiers(dtype)
        params = {
            key: [dict(model.named_parameters())[key].detach() for model in models]
            for key, _ in models[0].named_parameters()
            if key.startswith("convnext.")
        }
        fishers = [load_file(str(out / f"fishers_task{index}_{precision}.safetensors")) for index in range(num_tasks)]
        with torch.no_grad():
            merged = merging_with_fisher_weights(
                params, fishers, torch.ones(num_tasks) / num_tasks, normalize_fisher_weight=normalize,
                minimal_fisher_weight=MINIMAL_FISHER_WEIGHT,
            )  # fmt: skip
        save(merged, "merging_with_fisher_weights", label)
        for batch_size in (1, BATCH):
            trainers = [_Trainer(task_images.to(dtype), batch_size) for task_images in images]
            with contextlib.redirect_stdout(open(os.devnull, "w")):  # a warning per model, and a progress bar
                merged = fisher_merging(
                    classifiers(dtype), trainers, [r"classifier\..*"], [len(task_images) for task_images in images],
                    normalize_fisher_weight=normalize, minimal_fisher_weight=MINIMAL_FISHER_WEIGHT,
                )  # fmt: skip
            save(merged, f"fisher_merging (batch {batch_size})", label)


def merge_fusionbench_regmean_plusplus(root: Path, num_tasks: int, out: Path) -> None:
    """FusionBench's RegMean++ loop on the pool's ConvNeXt backbones; imports nothing from the project."""
    _import_fusionbench()
    import torch
    from fusion_bench.method.regmean_plusplus.clip_regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageClassification

    class NoFabric:
        """``get_regmean_weights`` sets the layer up with Lightning Fabric: on one CPU process, as it is."""

        def setup(self, module):
            return module

    class ImagePool(BaseModelPool):
        """The backbones, and each task's batches of images as its "train dataset"."""

        def __init__(self, models, batches) -> None:
            super().__init__(models)
            self.batches = batches

        def load_train_dataset(self, dataset_name, *args, **kwargs):
            return self.batches[dataset_name]

    class ConvNextRegMeanPlusPlus(RegMeanAlgorithmPlusPlus):
        """What FusionBench's CLIP subclass supplies, for a ConvNeXt backbone (see the module docstring)."""

        get_regmean_weights = RegMeanAlgorithmForCLIPPlusPlus.get_regmean_weights  # its own hooks and running means
        fabric = NoFabric()

        def blocks(self, model):
            return [(s, j, layer) for s, stage in enumerate(model.encoder.stages) for j, layer in enumerate(stage.layers)]

        def merge_embedding_layer(self, models_to_merge_dict):
            states = [model.state_dict() for model in models_to_merge_dict.values()]
            return {key: torch.stack([state[key] for state in states]).mean(0) for key in states[0] if ".layers." not in key}

        def get_input_for_first_layer(self, model, train_dataset):
            self.merged = model  # the merged model: its downsampling layers run between stages
            return [model.embeddings(batch).detach() for batch in train_dataset]

        def get_layers(self, model):
            blocks = self.blocks(model)
            self.position = getattr(self, "position", {})
            self.position.update({id(layer): (s, j) for s, j, layer in blocks})
            return [layer for _, _, layer in blocks]

        def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
            s, j, _ = self.blocks(self.merged)[layer_idx]
            merged_params_dict.update({f"encoder.stages.{s}.layers.{j}.{key}": value for key, value in new_merged_params.items()})
            return merged_params_dict

        def layer_batches_forward(self, layer, batches_input):
            s, j = self.position[id(layer)]
            stages = self.merged.encoder.stages
            outputs = []
            for batch in batches_input:
                output = layer(batch)
                if j == len(stages[s].layers) - 1 and s + 1 < len(stages):  # into the next stage, merged
                    for module in stages[s + 1].downsampling_layer:
                        output = module(output)
                outputs.append(output.detach())
            return outputs

    dirs = pool_dirs(root, num_tasks)
    names = [f"task{index}" for index in range(num_tasks)]
    for ratio, precision in itertools.product(RATIOS, PRECISIONS):
        dtype = getattr(torch, precision)
        models = {name: AutoModelForImageClassification.from_pretrained(dirs[name]).convnext.to(dtype).eval() for name in dirs}
        batches = {
            name: list(load_file(str(root / f"images_task{index}.safetensors"))["images"].to(dtype).split(BATCH))
            for index, name in enumerate(names)
        }
        algorithm = ConvNextRegMeanPlusPlus(
            num_regmean_examples=max(num_images(index) for index in range(num_tasks)), exclude_param_names_regex=[],
            reduce_non_diagonal_ratio=ratio, weight_transpose=True,
        )  # fmt: skip
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            merged = algorithm.run(ImagePool(models, batches))
        tensors = {
            f"convnext.{key}": tensor.detach().to(torch.float32).contiguous() for key, tensor in merged.state_dict().items()
        }
        save_file(tensors, str(out / f"fusionbench_regmean_plusplus_{ratio:g}_{precision}.safetensors"))


if __name__ == "__main__":
    main()
