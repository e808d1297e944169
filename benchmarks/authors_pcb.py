"""PCB-Merging against the authors' code (``duguodong7/pcb-merging``), on tiny ConvNeXt pools.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.authors_pcb --pcb-repo /path/to/pcb-merging
        [--reference-python /tmp/fbvenv/bin/python] [--workdir DIR] [--tasks 2,3,8]

``--pcb-repo``: a clone of https://github.com/duguodong7/pcb-merging (a checkout or a bare git
directory: the file is read with ``git show HEAD:pcb-merging.py``), kept outside the project.
That file defines the PCB function their README points to (``PCB_merge`` with its helpers
``normalize``, ``clamp`` and ``act``) and then runs an experiment at module level with names it
never defines, so it is not imported: the script takes the file's function definitions out with
``ast`` and runs them unchanged, with ``torch`` (all they use). Nothing of theirs is rewritten. It
runs in ``--reference-python`` (torch only; FusionBench's venv has it) and imports nothing from
the project there.

Their side flattens each backbone into one vector (the keys sorted, as their
``state_dict_to_vector``), calls ``PCB_merge(task_vectors, pcb_ratio)`` and adds
``lambda * merged_tv`` to the flat pretrained vector (their ``merging.py``: ``flat_ptm + lam *
merged_tv``), on the float32 models (as it runs) and on the same models cast to float64. Ours
merges through ``ModelPool`` and ``merge_backbone``, ``PCBMerging`` with ``formula="authors"``
(their function, streamed) and with ``formula="paper"`` (the paper's equations, which their
function does not follow: ``merging/pcb.py``). The pools are those of
``benchmarks/fusionbench_datafree.py`` (``benchmarks.tiny_pool``). Settings (``pcb_ratio``,
lambda): their vision code's 0.05 and 1.2, their function's default 0.1 with 1.0, and 0.2 with
0.8. Printed per setting and pool: the largest absolute difference over the backbone, the count
of entries that differ by more than ``1e-5`` (an entry one side keeps at a task's threshold and
the other drops: the scores of the two sides differ in their last bits, their order near a
threshold may too), and the largest update. It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

#: (label, pcb_ratio, lambda)
SETTINGS = [("pcb_0.05_1.2", 0.05, 1.2), ("pcb_0.1_1.0", 0.1, 1.0), ("pcb_0.2_0.8", 0.2, 0.8)]
#: A difference above this is an entry kept on one side and dropped on the other, not rounding.
FLIP = 1e-5


def pool_dirs(root: Path, num_tasks: int) -> dict[str, Path]:
    return {"_pretrained_": root / "pretrained", **{f"task{t}": root / f"task{t}" for t in range(num_tasks)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pcb-repo", type=Path, required=True, help="a clone of duguodong7/pcb-merging (checkout or bare)")
    parser.add_argument("--reference-python", default="/tmp/fbvenv/bin/python", help="python with torch and safetensors")
    parser.add_argument("--workdir", type=Path, help="where pools and merges are written (default: a temporary folder)")
    parser.add_argument("--tasks", default="2,3,8", help="pool sizes T, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(t) for t in args.tasks.split(",")]
    if args.reference_side:
        for num_tasks in sizes:
            root = args.workdir / f"T{num_tasks}"
            merge_authors(args.pcb_repo, root, num_tasks, root / "merged")
        return
    from benchmarks import fusionbench_datafree as datafree
    from benchmarks.tiny_pool import NOISE, write_tiny_pool

    with tempfile.TemporaryDirectory(prefix="authors-pcb-") as scratch:
        workdir = args.workdir or Path(scratch)
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            (root / "merged").mkdir(parents=True, exist_ok=True)
            write_tiny_pool(pool_dirs(root, num_tasks), datafree.TINY, args.seed + num_tasks)
            merge_ours(root, num_tasks, root / "merged")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        command = [args.reference_python, str(Path(__file__).resolve()), "--reference-side", "--workdir", str(workdir)]
        command += ["--tasks", args.tasks, "--pcb-repo", str(args.pcb_repo.resolve())]
        done = subprocess.run(command, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the reference side failed:\n{done.stderr[-4000:]}")
        print(
            f"largest |ours - the authors' PCB_merge| of the merged backbones (tiny ConvNeXt {datafree.TINY['hidden_sizes']}, noise {NOISE})"
        )
        print(f"{'':18s} {'':>3s} {'formula=authors vs theirs as it runs / on float64':>52s}  {'formula=paper':>13s}")
        print(
            f"{'setting':18s} {'T':>3s} {'max':>9s} {'> 1e-5':>7s}   {'max':>9s} {'> 1e-5':>7s}   {'max':>13s}  {'max |theta - theta_0|':>22s}"
        )
        worst = [0.0, 0.0, 0.0]
        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            for label, row in compare(root, num_tasks, root / "merged").items():
                print(
                    f"{label:18s} {num_tasks:3d} {row['float32']:9.2e} {row['float32_flips']:7d}   "
                    f"{row['float64']:9.2e} {row['float64_flips']:7d}   {row['paper']:13.2e}  {row['update']:22.3f}"
                )
                worst = [max(worst[0], row["float32"]), max(worst[1], row["float64"]), max(worst[2], row["paper"])]
        print(
            f"largest difference, formula=authors (theirs as it runs / on float64): {worst[0]:.2e} / {worst[1]:.2e}; "
            f"formula=paper: {worst[2]:.2e}"
        )


def merge_ours(root: Path, num_tasks: int, out: Path) -> None:
    from safetensors.torch import save_file

    from merging.engine import merge_backbone
    from merging.pcb import PCBMerging
    from merging.pool import ModelPool

    for label, ratio, scaling_factor in SETTINGS:
        for formula in ("authors", "paper"):
            pool = ModelPool({name: str(path) for name, path in pool_dirs(root, num_tasks).items()})
            method = PCBMerging(pcb_ratio=ratio, scaling_factor=scaling_factor, formula=formula)
            merged = merge_backbone(pool, method, progress=False)
            save_file(
                {key: tensor.contiguous() for key, tensor in merged.items()}, str(out / f"ours_{formula}_{label}.safetensors")
            )


def compare(root: Path, num_tasks: int, out: Path) -> dict[str, dict[str, float]]:
    import torch
    from safetensors.torch import load_file

    pretrained = load_file(str(pool_dirs(root, num_tasks)["_pretrained_"] / "model.safetensors"))
    results = {}
    for label, _, _ in SETTINGS:
        ours = {formula: load_file(str(out / f"ours_{formula}_{label}.safetensors")) for formula in ("authors", "paper")}
        row = {"update": 0.0, "paper": 0.0}
        for suffix, column in (("", "float32"), ("_float64", "float64")):
            theirs = load_file(str(out / f"authors_{label}{suffix}.safetensors"))
            if set(theirs) != set(ours["authors"]):
                raise SystemExit(f"{label}: different keys: {sorted(set(theirs) ^ set(ours['authors']))}")
            row[column], row[f"{column}_flips"] = 0.0, 0
            for key, tensor in ours["authors"].items():
                if not torch.isfinite(theirs[key]).all():
                    raise SystemExit(f"{label}: their '{key}' is not finite")
                difference = (tensor.double() - theirs[key].double()).abs()
                row[column] = max(row[column], float(difference.max()))
                row[f"{column}_flips"] += int((difference > FLIP).sum())
                if suffix == "":
                    row["paper"] = max(row["paper"], float((ours["paper"][key].double() - theirs[key].double()).abs().max()))
                    row["update"] = max(row["update"], float((tensor - pretrained[key]).abs().max()))
        results[label] = row
    return results


# ---------------------------------------------------------------- reference side (--reference-python)


def authors_functions(repo: Path) -> dict:
    """The function definitions of their ``pcb-merging.py`` (``normalize``, ``clamp``, ``act``,
    ``PCB_merge``), unchanged, in a namespace with ``torch``."""
    import ast

    import torch

    source = subprocess.run(
        ["git", "-C", str(repo), "show", "HEAD:pcb-merging.py"], check=True, capture_output=True, text=True
    ).stdout
    definitions = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=definitions, type_ignores=[]), "pcb-merging.py", "exec"), namespace)
    return namespace


def merge_authors(repo: Path, root: Path, num_tasks: int, out: Path) -> None:
    """Their ``PCB_merge`` on the pool's flattened backbones, then ``flat_ptm + lam * merged_tv``."""
    import torch
    from safetensors.torch import load_file, save_file

    pcb_merge = authors_functions(repo)["PCB_merge"]
    dirs = pool_dirs(root, num_tasks)
    states = {name: load_file(str(path / "model.safetensors")) for name, path in dirs.items()}
    keys = sorted(key for key in states["_pretrained_"] if key.startswith("convnext."))
    for dtype, suffix in [(torch.float32, ""), (torch.float64, "_float64")]:
        flat = {name: torch.cat([state[key].reshape(-1).to(dtype) for key in keys]) for name, state in states.items()}
        flat_ptm = flat.pop("_pretrained_")
        task_vectors = torch.stack(list(flat.values())) - flat_ptm
        for label, ratio, scaling_factor in SETTINGS:
            with torch.no_grad():
                merged_tv, _, _ = pcb_merge(task_vectors, pcb_ratio=ratio)
                merged = flat_ptm + scaling_factor * merged_tv
            state, start = {}, 0
            for key in keys:
                size = states["_pretrained_"][key].numel()
                state[key] = merged[start : start + size].view(states["_pretrained_"][key].shape).to(torch.float32).contiguous()
                start += size
            save_file(state, str(out / f"authors_{label}{suffix}.safetensors"))


if __name__ == "__main__":
    main()
