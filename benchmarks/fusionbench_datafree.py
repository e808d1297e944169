"""The data-free methods FusionBench 0.2.33 has (Model Stock, MagMax, WUDI) against its implementations,
on tiny ConvNeXt pools.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.fusionbench_datafree --fusionbench-python /tmp/fbvenv/bin/python
        [--workdir DIR] [--tasks 2,3,8] [--methods model_stock,...]

The oracle runs in its own venv, never in the project's:
``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install torch==2.13.0 fusion-bench==0.2.33``.

As ``benchmarks/fusionbench_spectral.py``: for each pool size ``T`` (``--tasks``) the project
side writes a tiny pool (``benchmarks.tiny_pool``: a pretrained ``ConvNextForImageClassification``
with ``hidden_sizes=[8,16,32,64]`` and ``T`` copies with seeded Gaussian noise on every tensor),
merges its backbones with the project's methods through ``ModelPool`` and ``merge_backbone`` (the
flow ``merge.py`` runs) and saves each result as safetensors. The FusionBench side, this same file
started with ``--fusionbench-python`` as ``--fusionbench-side``, imports only the standard
library, torch, transformers and fusion_bench, builds a ``BaseModelPool`` of the ``ConvNextModel``
backbones, runs FusionBench's class for each method on CPU, as its configs run it, and saves the
merged backbones, twice: on the float32 models (as FusionBench runs) and on the same models cast
to float64 (FusionBench then computes in float64, which shows what is rounding and what is not).

Printed: per method and pool the largest absolute difference between our merged backbone and
each of FusionBench's, over the matrices (``pwconv`` weights) and the other parameters, beside
the largest ``|theta - theta_0|`` for scale. It measures and prints; it asserts nothing.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an older
Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64]}
#: (label, our class as module:name, its hyper-parameters, FusionBench's class in fusion_bench.method, its arguments)
METHODS = [
    ("model_stock", "merging.model_stock:ModelStock", {}, "ModelStock", {}),
    ("mag_max", "merging.magmax:MagMax", {"scaling_factor": 0.5}, "MagMaxAlgorithm", {"scaling_factor": 0.5}),
    ("mag_max_1.0", "merging.magmax:MagMax", {"scaling_factor": 1.0}, "MagMaxAlgorithm", {"scaling_factor": 1.0}),
    ("wudi_300", "merging.wudi:WUDIMerging", {"iter_num": 300}, "WUDIMerging", {"iter_num": 300}),
    ("wudi_400", "merging.wudi:WUDIMerging", {"iter_num": 400}, "WUDIMerging", {"iter_num": 400}),
]


def pool_dirs(root: Path, num_tasks: int) -> dict[str, Path]:
    return {"_pretrained_": root / "pretrained", **{f"task{t}": root / f"task{t}" for t in range(num_tasks)}}


def chosen(labels: str | None) -> list[tuple]:
    if not labels:
        return METHODS
    wanted = labels.split(",")
    unknown = sorted(set(wanted) - {method[0] for method in METHODS})
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}: choose from {[method[0] for method in METHODS]}")
    return [method for method in METHODS if method[0] in wanted]


# ---------------------------------------------------------------- project side (.venv)


def merge_ours(root: Path, num_tasks: int, out: Path, methods: list[tuple]) -> None:
    from safetensors.torch import save_file

    from merging.engine import merge_backbone
    from merging.pool import ModelPool

    for label, ours, params, _, _ in methods:
        module, _, name = ours.partition(":")
        method = getattr(importlib.import_module(module), name)(**params)
        pool = ModelPool({name: str(path) for name, path in pool_dirs(root, num_tasks).items()})
        merged = merge_backbone(pool, method, progress=False)
        save_file({key: tensor.contiguous() for key, tensor in merged.items()}, str(out / f"ours_{label}.safetensors"))


def compare(
    root: Path, num_tasks: int, out: Path, methods: list[tuple], reference: str = "fusionbench"
) -> dict[str, dict[str, float]]:
    """Per method: the largest |ours - reference| over the matrices and over the other
    parameters, against the reference as it runs (float32) and run on float64 models
    (``{reference}_{label}[_float64].safetensors`` in ``out``)."""
    import torch
    from safetensors.torch import load_file

    pretrained = load_file(str(pool_dirs(root, num_tasks)["_pretrained_"] / "model.safetensors"))
    results = {}
    for label, *_ in methods:
        ours = load_file(str(out / f"ours_{label}.safetensors"))
        row = {"update": 0.0}
        for suffix in ("", "_float64"):
            theirs = load_file(str(out / f"{reference}_{label}{suffix}.safetensors"))
            if set(ours) != set(theirs):
                raise SystemExit(f"{label}: different keys: {sorted(set(ours) ^ set(theirs))}")
            for key, tensor in ours.items():
                if not torch.isfinite(theirs[key]).all():
                    raise SystemExit(f"{label}: the reference's '{key}' is not finite")
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
    parser.add_argument("--methods", help=f"labels, comma-separated (default: all of {[m[0] for m in METHODS]})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fusionbench-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(t) for t in args.tasks.split(",")]
    methods = chosen(args.methods)
    if args.fusionbench_side:
        for num_tasks in sizes:
            root = args.workdir / f"T{num_tasks}"
            merge_fusionbench(root, num_tasks, root / "merged", methods)
        return
    with tempfile.TemporaryDirectory(prefix="fusionbench-datafree-") as scratch:
        workdir = args.workdir or Path(scratch)
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            (root / "merged").mkdir(parents=True, exist_ok=True)
            from benchmarks.tiny_pool import write_tiny_pool

            write_tiny_pool(pool_dirs(root, num_tasks), TINY, args.seed + num_tasks)
            merge_ours(root, num_tasks, root / "merged", methods)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        command = [args.fusionbench_python, str(Path(__file__).resolve()), "--fusionbench-side", "--workdir", str(workdir)]
        command += ["--tasks", args.tasks, "--methods", ",".join(method[0] for method in methods)]
        done = subprocess.run(command, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the FusionBench side failed:\n{done.stderr[-4000:]}")
        report(workdir, sizes, methods)


def report(workdir: Path, sizes: list[int], methods: list[tuple]) -> None:
    from benchmarks import tiny_pool

    print(
        f"largest |ours - FusionBench 0.2.33| of the merged backbones (tiny ConvNeXt {TINY['hidden_sizes']}, noise {tiny_pool.NOISE})"
    )
    print(f"{'':22s} {'FusionBench as it runs':>23s}  {'FusionBench on float64':>23s}")
    print(
        f"{'method':18s} {'T':>3s} {'matrices':>11s} {'other':>11s}  {'matrices':>11s} {'other':>11s}  {'max |theta - theta_0|':>22s}"
    )
    overall: dict[str, list[float]] = {}
    for num_tasks in sizes:
        root = workdir / f"T{num_tasks}"
        for label, row in compare(root, num_tasks, root / "merged", methods).items():
            print(
                f"{label:18s} {num_tasks:3d} {row['matrices']:11.2e} {row['other']:11.2e}  "
                f"{row['matrices_float64']:11.2e} {row['other_float64']:11.2e}  {row['update']:22.3f}"
            )
            worst = overall.setdefault(label, [0.0, 0.0])
            worst[0] = max(worst[0], row["matrices"], row["other"])
            worst[1] = max(worst[1], row["matrices_float64"], row["other_float64"])
    print("largest difference per method (FusionBench as it runs / on float64):")
    for label, (as_it_runs, on_float64) in overall.items():
        print(f"  {label:20s} {as_it_runs:.2e} / {on_float64:.2e}")


# ---------------------------------------------------------------- FusionBench side (/tmp/fbvenv)


def merge_fusionbench(root: Path, num_tasks: int, out: Path, methods: list[tuple]) -> None:
    """FusionBench's classes on the pool's backbones; imports nothing from the project."""
    import logging
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
    logging.disable(logging.WARNING)

    import fusion_bench.method
    import lightning as L
    import torch
    from fusion_bench import BaseModelPool
    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification

    def backbones(dtype: torch.dtype) -> BaseModelPool:
        # Fresh modules for every run: FusionBench writes the result into the pretrained one.
        models = {
            name: AutoModelForImageClassification.from_pretrained(path).convnext.to(dtype)
            for name, path in pool_dirs(root, num_tasks).items()
        }
        return BaseModelPool(models)

    for (label, _, _, theirs, arguments), (suffix, dtype) in itertools.product(
        methods, [("", torch.float32), ("_float64", torch.float64)]
    ):
        algorithm = getattr(fusion_bench.method, theirs)(**arguments)
        algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)  # those with LightningFabricMixin (WUDI) run here
        with torch.no_grad() if theirs != "WUDIMerging" else torch.enable_grad(), open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet  # some print a line per key
            try:
                merged = algorithm.run(backbones(dtype))
            finally:
                sys.stdout = stdout
        state = {f"convnext.{key}": tensor.detach().contiguous() for key, tensor in merged.state_dict().items()}
        save_file(state, str(out / f"fusionbench_{label}{suffix}.safetensors"))


if __name__ == "__main__":
    main()
