"""CART against the authors' code (``JH-GEECS/CART``), on tiny ConvNeXt pools.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.authors_cart --cart-repo /path/to/CART
        [--reference-python /tmp/fbvenv/bin/python] [--workdir DIR] [--tasks 2,3,8]

``--cart-repo``: a clone of https://github.com/JH-GEECS/CART (a checkout or a bare git
directory: the files are read with ``git show HEAD:<file>``). Its ``src/merging.py`` imports
ray, wandb, open_clip's models and the datasets at the top, so it is not imported: the script
takes the class ``StaticMergeModule`` out of that file with ``ast`` and runs its own code,
``_merge_weights("CART")`` (which calls its ``_get_origin`` and ``_get_truncated_task_vectors``),
unchanged, with ``src/models/task_vectors.py`` (torch only) for its ``TaskVector``. Nothing of
theirs is rewritten. It runs in ``--reference-python``, a venv with torch, numpy, omegaconf and
tqdm (FusionBench's venv has them all), and imports nothing from the project there.

Their code picks the matrices to cut by CLIP's key names (``attn`` or ``mlp`` in the key, neither
``ln`` nor ``bias``); a ConvNeXt has none, so the reference side hands it the state dicts with
``mlp.`` put in front of the 2-D weights' keys (the ``pwconv`` Linear weights, each block's MLP),
and takes it off again: their code then cuts exactly the tensors ours cuts.

The pools are those of ``benchmarks/fusionbench_datafree.py`` (``benchmarks.tiny_pool``); ours
merges through ``ModelPool`` and ``merge_backbone``. The authors' code runs on the float32 models
(as it runs: float32 SVDs) and on the same models cast to float64. Settings: their 8-task
(rank ratio 0.12, prior 2.0) and 20-task (0.32, 1.9) configs and 0.5 / 1.0. Printed: the largest
absolute difference per setting and pool, over the matrices and the other parameters. It
measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: (label, rank_ratio, scaling_factor = their "prior")
SETTINGS = [("cart_0.12_2.0", 0.12, 2.0), ("cart_0.32_1.9", 0.32, 1.9), ("cart_0.5_1.0", 0.5, 1.0)]
#: What the authors' key filter looks for (``"attn" in key or "mlp" in key``).
MARK = "mlp."


def pool_dirs(root: Path, num_tasks: int) -> dict[str, Path]:
    return {"_pretrained_": root / "pretrained", **{f"task{t}": root / f"task{t}" for t in range(num_tasks)}}


def as_methods() -> list[tuple]:
    """The settings as ``benchmarks.fusionbench_datafree``'s method tuples (for its merge and compare)."""
    return [
        (label, "merging.cart:CART", {"rank_ratio": ratio, "scaling_factor": prior}, None, None)
        for label, ratio, prior in SETTINGS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cart-repo", type=Path, required=True, help="a clone of JH-GEECS/CART (checkout or bare)")
    parser.add_argument("--reference-python", default="/tmp/fbvenv/bin/python", help="python with torch, numpy, omegaconf, tqdm")
    parser.add_argument("--workdir", type=Path, help="where pools and merges are written (default: a temporary folder)")
    parser.add_argument("--tasks", default="2,3,8", help="pool sizes T, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(t) for t in args.tasks.split(",")]
    if args.reference_side:
        for num_tasks in sizes:
            root = args.workdir / f"T{num_tasks}"
            merge_authors(args.cart_repo, root, num_tasks, root / "merged")
        return
    from benchmarks import fusionbench_datafree as datafree
    from benchmarks.tiny_pool import NOISE, write_tiny_pool

    with tempfile.TemporaryDirectory(prefix="authors-cart-") as scratch:
        workdir = args.workdir or Path(scratch)
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            (root / "merged").mkdir(parents=True, exist_ok=True)
            write_tiny_pool(pool_dirs(root, num_tasks), datafree.TINY, args.seed + num_tasks)
            datafree.merge_ours(root, num_tasks, root / "merged", as_methods())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        command = [args.reference_python, str(Path(__file__).resolve()), "--reference-side", "--workdir", str(workdir)]
        command += ["--tasks", args.tasks, "--cart-repo", str(args.cart_repo.resolve())]
        done = subprocess.run(command, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the reference side failed:\n{done.stderr[-4000:]}")
        print(
            f"largest |ours - the authors' CART| of the merged backbones (tiny ConvNeXt {datafree.TINY['hidden_sizes']}, noise {NOISE})"
        )
        print(f"{'':22s} {'theirs as it runs':>23s}  {'theirs on float64':>23s}")
        print(
            f"{'setting':18s} {'T':>3s} {'matrices':>11s} {'other':>11s}  {'matrices':>11s} {'other':>11s}  {'max |theta - theta_0|':>22s}"
        )
        worst = [0.0, 0.0]
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            for label, row in datafree.compare(root, num_tasks, root / "merged", as_methods(), reference="authors").items():
                print(
                    f"{label:18s} {num_tasks:3d} {row['matrices']:11.2e} {row['other']:11.2e}  "
                    f"{row['matrices_float64']:11.2e} {row['other_float64']:11.2e}  {row['update']:22.3f}"
                )
                worst = [
                    max(worst[0], row["matrices"], row["other"]),
                    max(worst[1], row["matrices_float64"], row["other_float64"]),
                ]
        print(f"largest difference (theirs as it runs / on float64): {worst[0]:.2e} / {worst[1]:.2e}")


# ---------------------------------------------------------------- reference side (--reference-python)


def authors_file(repo: Path, path: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True, text=True).stdout


def merge_authors(repo: Path, root: Path, num_tasks: int, out: Path) -> None:
    """The authors' ``StaticMergeModule._merge_weights("CART")`` on the pool's backbones."""
    import ast
    import typing
    from copy import deepcopy

    import numpy as np
    import torch
    from omegaconf import DictConfig, OmegaConf
    from safetensors.torch import load_file, save_file
    from torch import nn
    from tqdm import tqdm

    task_vectors_module: dict = {}
    exec(compile(authors_file(repo, "src/models/task_vectors.py"), "src/models/task_vectors.py", "exec"), task_vectors_module)
    source = authors_file(repo, "src/merging.py")
    (definition,) = [
        node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == "StaticMergeModule"
    ]
    namespace = {
        "torch": torch, "nn": nn, "np": np, "deepcopy": deepcopy, "tqdm": tqdm, "OmegaConf": OmegaConf,
        "DictConfig": DictConfig, "CPU_DEVICE": "cpu", "TaskVector": task_vectors_module["TaskVector"],
        "ImageEncoder": nn.Module, **{name: getattr(typing, name) for name in ("List", "Optional", "Union", "Dict")},
    }  # fmt: skip
    exec(compile(ast.Module(body=[definition], type_ignores=[]), "src/merging.py", "exec"), namespace)
    static_merge_module, task_vector = namespace["StaticMergeModule"], namespace["TaskVector"]

    class Encoder:
        """What the module asks of its zero-shot encoder: ``state_dict()``."""

        def __init__(self, state: dict) -> None:
            self.state = state

        def state_dict(self) -> dict:
            return self.state

    def mark(key: str, tensor) -> str:
        return MARK + key if tensor.ndim == 2 else key

    dirs = pool_dirs(root, num_tasks)
    states = {name: load_file(str(path / "model.safetensors")) for name, path in dirs.items()}
    backbone = [key for key in states["_pretrained_"] if key.startswith("convnext.")]
    for dtype, suffix in [(torch.float32, ""), (torch.float64, "_float64")]:
        pretrained = {mark(key, states["_pretrained_"][key]): states["_pretrained_"][key].to(dtype) for key in backbone}
        vectors = [
            task_vector(vector={mark(key, states[name][key]): states[name][key].to(dtype) - pretrained[mark(key, states[name][key])]
                                for key in backbone})
            for name in dirs if name != "_pretrained_"
        ]  # fmt: skip
        for label, ratio, prior in SETTINGS:
            config = OmegaConf.create({"tasks": [name for name in dirs if name != "_pretrained_"], "device": "cpu",
                                       "prior": prior, "initial_rank_ratio": ratio})  # fmt: skip
            module = static_merge_module(config, Encoder(deepcopy(pretrained)), deepcopy(vectors))
            with torch.no_grad(), open(os.devnull, "w") as quiet:
                stdout, sys.stdout = sys.stdout, quiet  # it prints its settings
                try:
                    module._merge_weights("CART")
                finally:
                    sys.stdout = stdout
            merged = {key.removeprefix(MARK): tensor.contiguous() for key, tensor in module._merged_state_dict.items()}
            save_file(merged, str(out / f"authors_{label}{suffix}.safetensors"))


if __name__ == "__main__":
    main()
