"""TSV-M, Iso-C and Iso-CTS against FusionBench 0.2.33's implementations, on tiny ConvNeXt pools.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.fusionbench_spectral --fusionbench-python /tmp/fbvenv/bin/python
        [--workdir DIR] [--tasks 2,3,8]

The oracle runs in its own venv, never in the project's:
``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install torch==2.13.0 fusion-bench==0.2.33``.

For each pool size ``T`` (``--tasks``) the project side (this venv) writes a pool into
``--workdir`` (a temporary folder by default): a tiny pretrained
``ConvNextForImageClassification`` (``depths=[1,1,1,1]``, ``hidden_sizes=[8,16,32,64]``, so its
``pwconv`` matrices have rank 8 to 64) and ``T`` "fine-tuned" ones, each the pretrained backbone
plus seeded Gaussian noise, saved with ``save_pretrained``. It merges the backbones with
``merging.spectral``'s ``TaskSingularVectors``, ``IsotropicCommon`` and ``IsotropicCommonTask``
through ``ModelPool`` and ``merge_backbone`` (the flow ``merge.py`` runs) and saves each result
as safetensors.

The FusionBench side is this same file started with ``--fusionbench-python`` as
``--fusionbench-side``: it imports nothing from the project, only the standard library, torch,
transformers and fusion_bench, reads the pool's directories, builds a ``BaseModelPool`` of the
``ConvNextModel`` backbones (``AutoModelForImageClassification.from_pretrained(dir).convnext``,
FusionBench's methods take any ``nn.Module`` pool), runs ``TaskSingularVectorMerging(alpha)``,
``IsotropicMergingInCommonSubspace(scaling_factor)`` and
``IsotropicMergingInCommonAndTaskSubspace(scaling_factor, common_space_fraction)`` on CPU with
their default ``exclude_keys`` (none) and saves the merged backbones as safetensors, twice:
as FusionBench runs on these float32 models (its SVDs in float32), and on the same models cast
to float64 (FusionBench then computes in float64).

Printed: per method and pool, the largest absolute difference between our merged backbone
and each of FusionBench's, over the matrices (``pwconv`` weights) and over the other
parameters, beside the largest ``|theta - theta_0|`` for scale. Ours computes the SVDs in
float64 and rounds once, so the float64 column is one float32 rounding (about 1e-7) and the
other column FusionBench's own float32 SVD error (about 1e-5 here). It measures and prints; it
asserts nothing.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an older
Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64]}
#: (label, our class in merging.spectral, hyper-parameters as ours name them)
METHODS = [
    ("tsv_m", "TaskSingularVectors", {"scaling_factor": 1.0}),
    ("tsv_m_0.7", "TaskSingularVectors", {"scaling_factor": 0.7}),
    ("iso_c", "IsotropicCommon", {"scaling_factor": 1.0}),
    ("iso_c_1.5", "IsotropicCommon", {"scaling_factor": 1.5}),
    ("iso_cts", "IsotropicCommonTask", {"common_space_fraction": 0.8, "scaling_factor": 1.0}),
    ("iso_cts_0.5_1.5", "IsotropicCommonTask", {"common_space_fraction": 0.5, "scaling_factor": 1.5}),
]


def pool_dirs(root: Path, num_tasks: int) -> dict[str, Path]:
    return {"_pretrained_": root / "pretrained", **{f"task{t}": root / f"task{t}" for t in range(num_tasks)}}


# ---------------------------------------------------------------- project side (.venv)


def write_pool(root: Path, num_tasks: int, seed: int) -> None:
    from benchmarks.tiny_pool import write_tiny_pool

    write_tiny_pool(pool_dirs(root, num_tasks), TINY, seed)


def merge_ours(root: Path, num_tasks: int, out: Path) -> None:
    from safetensors.torch import save_file

    import merging.spectral as spectral
    from merging.engine import merge_backbone
    from merging.pool import ModelPool

    for label, cls, params in METHODS:
        pool = ModelPool({name: str(path) for name, path in pool_dirs(root, num_tasks).items()})
        merged = merge_backbone(pool, getattr(spectral, cls)(**params), progress=False)
        save_file({key: tensor.contiguous() for key, tensor in merged.items()}, str(out / f"ours_{label}.safetensors"))


def compare(root: Path, num_tasks: int, out: Path) -> dict[str, dict[str, float]]:
    """Per method: the largest |ours - FusionBench| over the matrices and over the other
    parameters, against FusionBench as it runs (float32) and run on float64 models."""
    import torch
    from safetensors.torch import load_file

    pretrained = load_file(str(pool_dirs(root, num_tasks)["_pretrained_"] / "model.safetensors"))
    results = {}
    for label, _, _ in METHODS:
        ours = load_file(str(out / f"ours_{label}.safetensors"))
        row = {"update": 0.0}
        for suffix in ("", "_float64"):
            theirs = load_file(str(out / f"fusionbench_{label}{suffix}.safetensors"))
            if set(ours) != set(theirs):
                raise SystemExit(f"{label}: different keys: {sorted(set(ours) ^ set(theirs))}")
            for key, tensor in ours.items():
                if not torch.isfinite(theirs[key]).all():
                    raise SystemExit(f"{label}: FusionBench's '{key}' is not finite")
                column = ("matrices" if tensor.ndim == 2 else "other") + suffix
                difference = float((tensor.double() - theirs[key].double()).abs().max())
                row[column] = max(row.get(column, 0.0), difference)
                row["update"] = max(row["update"], float((tensor - pretrained[key]).abs().max()))
        results[label] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fusionbench-python", default="/tmp/fbvenv/bin/python", help="python of a venv with fusion-bench==0.2.33"
    )
    parser.add_argument("--workdir", type=Path, help="where pools and merges are written (default: a temporary folder)")
    parser.add_argument("--tasks", default="2,3,8", help="pool sizes T, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fusionbench-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(t) for t in args.tasks.split(",")]
    if args.fusionbench_side:
        for num_tasks in sizes:
            merge_fusionbench(args.workdir / f"T{num_tasks}", num_tasks, args.workdir / f"T{num_tasks}" / "merged")
        return
    with tempfile.TemporaryDirectory(prefix="fusionbench-spectral-") as scratch:
        workdir = args.workdir or Path(scratch)
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            (root / "merged").mkdir(parents=True, exist_ok=True)
            write_pool(root, num_tasks, args.seed + num_tasks)
            merge_ours(root, num_tasks, root / "merged")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        command = [
            args.fusionbench_python,
            str(Path(__file__).resolve()),
            "--fusionbench-side",
            "--workdir",
            str(workdir),
            "--tasks",
            args.tasks,
        ]
        done = subprocess.run(command, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the FusionBench side failed:\n{done.stderr[-4000:]}")
        report(workdir, sizes)


def report(workdir: Path, sizes: list[int]) -> None:
    from benchmarks import tiny_pool

    print(
        f"largest |ours - FusionBench 0.2.33| of the merged backbones (tiny ConvNeXt {TINY['hidden_sizes']}, noise {tiny_pool.NOISE})"
    )
    print(f"{'':22s} {'FusionBench as it runs':>23s}  {'FusionBench on float64':>23s}")
    print(
        f"{'method':18s} {'T':>3s} {'matrices':>11s} {'other':>11s}  {'matrices':>11s} {'other':>11s}  {'max |theta - theta_0|':>22s}"
    )
    classes = {label: cls for label, cls, _ in METHODS}
    overall: dict[str, list[float]] = {}
    for num_tasks in sizes:
        root = workdir / f"T{num_tasks}"
        for label, row in compare(root, num_tasks, root / "merged").items():
            print(
                f"{label:18s} {num_tasks:3d} {row['matrices']:11.2e} {row['other']:11.2e}  "
                f"{row['matrices_float64']:11.2e} {row['other_float64']:11.2e}  {row['update']:22.3f}"
            )
            worst = overall.setdefault(classes[label], [0.0, 0.0])
            worst[0] = max(worst[0], row["matrices"], row["other"])
            worst[1] = max(worst[1], row["matrices_float64"], row["other_float64"])
    print("largest difference per method (FusionBench as it runs / on float64):")
    for cls, (as_it_runs, on_float64) in overall.items():
        print(f"  {cls:20s} {as_it_runs:.2e} / {on_float64:.2e}")


# ---------------------------------------------------------------- FusionBench side (/tmp/fbvenv)


def merge_fusionbench(root: Path, num_tasks: int, out: Path) -> None:
    """FusionBench's three methods on the pool's backbones; imports nothing from the project."""
    import logging
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
    logging.disable(logging.WARNING)

    import lightning as L
    import torch
    from fusion_bench import BaseModelPool
    from fusion_bench.method import (
        IsotropicMergingInCommonAndTaskSubspace,
        IsotropicMergingInCommonSubspace,
        TaskSingularVectorMerging,
    )
    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification

    def backbones(dtype: torch.dtype) -> BaseModelPool:
        # Fresh modules for every run: FusionBench writes the result into the pretrained one.
        models = {
            name: AutoModelForImageClassification.from_pretrained(path).convnext.to(dtype)
            for name, path in pool_dirs(root, num_tasks).items()
        }
        return BaseModelPool(models)

    for (label, cls, params), (suffix, dtype) in itertools.product(METHODS, [("", torch.float32), ("_float64", torch.float64)]):
        if cls == "TaskSingularVectors":
            algorithm = TaskSingularVectorMerging(alpha=params["scaling_factor"])
        elif cls == "IsotropicCommon":
            algorithm = IsotropicMergingInCommonSubspace(scaling_factor=params["scaling_factor"])
        else:
            algorithm = IsotropicMergingInCommonAndTaskSubspace(
                scaling_factor=params["scaling_factor"], common_space_fraction=params["common_space_fraction"]
            )
        algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)
        with torch.no_grad(), open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet  # FusionBench prints a line per key
            try:
                merged = algorithm.run(backbones(dtype))
            finally:
                sys.stdout = stdout
        state = {f"convnext.{key}": tensor.detach().contiguous() for key, tensor in merged.state_dict().items()}
        save_file(state, str(out / f"fusionbench_{label}{suffix}.safetensors"))


if __name__ == "__main__":
    main()
