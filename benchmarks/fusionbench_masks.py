"""The mask-based methods (Consensus task arithmetic, TALL masks, EMR-Merging) against FusionBench
0.2.33, on tiny ConvNeXt pools.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.fusionbench_masks --fusionbench-python /tmp/fbvenv/bin/python
        [--workdir DIR] [--tasks 2,3,8]

The oracle runs in its own venv, never in the project's:
``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install torch==2.13.0 fusion-bench==0.2.33``.

As ``benchmarks/fusionbench_datafree.py``: for each pool size ``T`` the project side writes a tiny
pool (``benchmarks.tiny_pool``), merges it with the project's methods through ``ModelPool`` and
``merge_backbone`` (Consensus) or ``merge_per_task`` (TALL masks, EMR: one backbone per task, each
saved), the flow ``merge.py`` runs. The FusionBench side, this same file started with
``--fusionbench-python`` as ``--fusionbench-side``, imports only the standard library, torch,
transformers and fusion_bench and runs, on the float32 ``ConvNextModel`` backbones:

* TALL masks, two ways: the steps of ``TallMaskTaskArithmeticAlgorithm.run`` (its functions, in its
  order; the class itself stops in 0.2.33 with a ``TypeError`` on every pool, its state dicts of
  ``Parameter``s failing the type check of ``state_dict_sub`` against its task vectors of plain
  tensors, so its steps run on plain tensors here), and the authors' construction that FusionBench keeps in ``tall_mask/utils.py``
  (``generate_task_masks`` on the flattened models, then ``theta_0 + m_t ⊙ tau_MTL`` as the authors'
  evaluation applies the masked vector with coefficient 1). The class compares
  ``|theta_0 - tau_t|`` (pretrained weights minus a task vector) where the paper and
  ``generate_task_masks`` compare ``|theta_0 - theta_t| = |tau_t|``: the first column shows that.
* Consensus task arithmetic: FusionBench has no class for it; its ``construct_consensus_mask``
  (``tall_mask/utils.py``, the authors' function) reads the TALL masks the authors' code saves
  (``np.packbits`` per task, here written for it at the same ``lambda``), counts them, keeps
  ``>= k``; the merge is ``theta_0 + alpha (consensus ⊙ tau_MTL)``, as the authors apply it.
* EMR-Merging: ``fusion_bench.method.emr_merging.EMRMerging`` (each task's backbone from a fresh
  copy of its modulated model, ``set_task``), and the same election and masks with the paper's
  rescaler, ``sum |tau_t| / sum |M_t ⊙ tau_uni|`` over the whole backbone, where FusionBench (as the
  authors' per-tensor script) sums each tensor's mean magnitude instead.

Printed: per method, pool and task the largest absolute difference between our backbone and
FusionBench's, and how many entries differ at all, beside the largest ``|theta - theta_0|`` for
scale; EMR's rescalers three ways. It measures and prints; it asserts nothing.

FusionBench 0.2.33 declares Python >= 3.10 but imports ``typing.override`` (3.12); on an older
Python ``typing_extensions.override`` stands in for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64]}
#: Consensus task arithmetic: (label, tall_mask_lambda, k, scaling_factor)
CONSENSUS = [("consensus_l0.4_k2", 0.4, 2, 0.5), ("consensus_l0.6_k1", 0.6, 1, 1.0)]
#: TALL masks: (label, tall_mask_lambda)
TALL = [("tall_masks_0.4", 0.4), ("tall_masks_0.6", 0.6)]


def pool_dirs(root: Path, num_tasks: int) -> dict[str, Path]:
    return {"_pretrained_": root / "pretrained", **{f"task{t}": root / f"task{t}" for t in range(num_tasks)}}


def task_names(num_tasks: int) -> list[str]:
    return [f"task{t}" for t in range(num_tasks)]


# ---------------------------------------------------------------- project side (.venv)


def merge_ours(root: Path, num_tasks: int, out: Path) -> None:
    from safetensors.torch import save_file

    from merging import ConsensusTaskArithmetic, EMRMerging, ModelPool, TallMasks, merge_backbone, merge_per_task

    pool = ModelPool({name: str(path) for name, path in pool_dirs(root, num_tasks).items()})

    def save(state, name: str) -> None:
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(out / f"ours_{name}.safetensors"))

    for label, tall_mask_lambda, k, scaling_factor in CONSENSUS:
        method = ConsensusTaskArithmetic(tall_mask_lambda=tall_mask_lambda, k=k, scaling_factor=scaling_factor)
        save(merge_backbone(pool, method, progress=False), label)
    per_task = [(label, TallMasks(tall_mask_lambda=value)) for label, value in TALL] + [("emr", EMRMerging())]
    for label, method in per_task:
        merged = merge_per_task(pool, method, progress=False)
        for task in merged.tasks:
            save(merged.backbone(task), f"{label}_{task}")
        if label == "emr":
            (out / "ours_emr_rescalers.json").write_text(json.dumps(merged.scales))


def compare(ours_path: Path, theirs_path: Path, pretrained: dict) -> tuple[float, int, float]:
    """The largest |ours - theirs| over the backbone, the number of entries that differ, and the
    largest |ours - theta_0|."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = load_file(str(ours_path)), load_file(str(theirs_path))
    if set(ours) != set(theirs):
        raise SystemExit(f"{ours_path.name}: different keys: {sorted(set(ours) ^ set(theirs))[:4]}")
    largest, differing, update = 0.0, 0, 0.0
    for key, tensor in ours.items():
        if not torch.isfinite(theirs[key]).all():
            raise SystemExit(f"{theirs_path.name}: '{key}' is not finite")
        difference = (tensor.double() - theirs[key].double()).abs()
        largest = max(largest, float(difference.max()))
        differing += int((difference > 0).sum())
        update = max(update, float((tensor - pretrained[key]).abs().max()))
    return largest, differing, update


def report(workdir: Path, sizes: list[int]) -> None:
    from safetensors.torch import load_file

    from benchmarks import tiny_pool

    print(
        f"largest |ours - FusionBench 0.2.33| (entries that differ) (tiny ConvNeXt {TINY['hidden_sizes']}, noise {tiny_pool.NOISE})"
    )
    overall: dict[str, float] = {}
    for num_tasks in sizes:
        root = workdir / f"T{num_tasks}"
        out = root / "merged"
        pretrained = load_file(str(pool_dirs(root, num_tasks)["_pretrained_"] / "model.safetensors"))
        print(f"T = {num_tasks}")
        consensus_variants = [("as_it_is", "construct_consensus_mask"), ("authors", "the same with the authors' deep copy")]
        explained = json.loads((out / "fusionbench_consensus_explained.json").read_text())
        for label, *_ in CONSENSUS:
            cells = []
            for variant, name in consensus_variants:
                largest, differing, update = compare(
                    out / f"ours_{label}.safetensors", out / f"fusionbench_{label}_{variant}.safetensors", pretrained
                )
                cells.append(f"{name}: {largest:9.2e} ({differing:5d})")
                overall[f"{label} ({name})"] = max(overall.get(f"{label} ({name})", 0.0), largest)
            print(f"  {label:24s} {'(one backbone)':14s} " + "   ".join(cells) + f"   max |theta - theta_0| {update:.3f}")
            print(
                f"  {'':39s} FusionBench's consensus mask is 1{{T m_T >= k}}, the last task's mask counted T times: {explained[label]}"
            )
        variants = {
            "tall": [("class", "TallMaskTaskArithmeticAlgorithm's steps"), ("utils", "generate_task_masks (authors')")],
            "emr": [("class", "EMRMerging as it runs"), ("paper", "its election, the paper's rescaler")],
        }
        for label in [label for label, _ in TALL] + ["emr"]:
            for task in task_names(num_tasks):
                cells = []
                for variant, name in variants["emr" if label == "emr" else "tall"]:
                    largest, differing, update = compare(
                        out / f"ours_{label}_{task}.safetensors",
                        out / f"fusionbench_{label}_{variant}_{task}.safetensors",
                        pretrained,
                    )
                    cells.append(f"{name}: {largest:9.2e} ({differing:5d})")
                    overall[f"{label} ({name})"] = max(overall.get(f"{label} ({name})", 0.0), largest)
                print(f"  {label:24s} {task:14s} " + "   ".join(cells) + f"   max |theta - theta_0| {update:.3f}")
        ours = json.loads((out / "ours_emr_rescalers.json").read_text())
        theirs = json.loads((out / "fusionbench_emr_rescalers.json").read_text())
        print("  EMR rescalers: ours (paper) " + ", ".join(f"{value:.6f}" for value in ours))
        print("                 FusionBench " + ", ".join(f"{value:.6f}" for value in theirs["as_it_runs"]))
        print("     the paper's, from FB's  " + ", ".join(f"{value:.6f}" for value in theirs["paper"]))
    print("largest difference per method and reference, over every pool and task:")
    for label, value in overall.items():
        print(f"  {label:60s} {value:.2e}")


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
            root = args.workdir / f"T{num_tasks}"
            merge_fusionbench(root, num_tasks, root / "merged")
        return
    with tempfile.TemporaryDirectory(prefix="fusionbench-masks-") as scratch:
        workdir = args.workdir or Path(scratch)
        from benchmarks.tiny_pool import write_tiny_pool

        for num_tasks in sizes:
            root = workdir / f"T{num_tasks}"
            (root / "merged").mkdir(parents=True, exist_ok=True)
            write_tiny_pool(pool_dirs(root, num_tasks), TINY, args.seed + num_tasks)
            merge_ours(root, num_tasks, root / "merged")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        command = [args.fusionbench_python, str(Path(__file__).resolve()), "--fusionbench-side", "--workdir", str(workdir)]
        done = subprocess.run(
            [*command, "--tasks", args.tasks], cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"the FusionBench side failed:\n{done.stderr[-4000:]}")
        report(workdir, sizes)


# ---------------------------------------------------------------- FusionBench side (/tmp/fbvenv)


def merge_fusionbench(root: Path, num_tasks: int, out: Path) -> None:
    """FusionBench's code on the pool's backbones; imports nothing from the project."""
    import copy
    import logging
    import typing
    from functools import partial
    from types import SimpleNamespace

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
    logging.disable(logging.WARNING)

    import numpy as np
    import torch
    from fusion_bench import BaseModelPool
    from fusion_bench.method import TallMaskTaskArithmeticAlgorithm
    from fusion_bench.method.emr_merging import EMRMerging
    from fusion_bench.method.tall_mask import utils as tall_mask_utils
    from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks as class_masks
    from fusion_bench.method.tall_mask.utils import construct_consensus_mask, generate_task_masks
    from fusion_bench.utils import state_dict_to_vector, vector_to_state_dict
    from fusion_bench.utils.state_dict_arithmetic import (
        state_dict_add,
        state_dict_hadamard_product,
        state_dict_sub,
        state_dict_sum,
    )
    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification

    tasks = task_names(num_tasks)

    def backbones() -> BaseModelPool:
        # Fresh modules for every run: some write into the pretrained one.
        models = {
            name: AutoModelForImageClassification.from_pretrained(path).convnext
            for name, path in pool_dirs(root, num_tasks).items()
        }
        return BaseModelPool(models)

    def save(state, name: str) -> None:
        tensors = {f"convnext.{key}": tensor.detach().clone().contiguous() for key, tensor in state.items()}
        save_file(tensors, str(out / f"fusionbench_{name}.safetensors"))

    def quietly(function, *args):
        with open(os.devnull, "w") as quiet:  # they print a line per mask
            stdout, sys.stdout = sys.stdout, quiet
            try:
                return function(*args)
            finally:
                sys.stdout = stdout

    torch.set_grad_enabled(False)
    pool = backbones()
    ptm_check = pool.load_model("_pretrained_").state_dict()
    ft_checks = [pool.load_model(task).state_dict() for task in tasks]
    flat_ptm = state_dict_to_vector(ptm_check)
    flat_ft = torch.vstack([state_dict_to_vector(check) for check in ft_checks])
    tv_flat_checks = flat_ft - flat_ptm
    merged_tv = tv_flat_checks.sum(dim=0)

    def as_state(vector):  # vector_to_state_dict writes into its reference: a fresh copy each time
        return vector_to_state_dict(vector, copy.deepcopy(ptm_check))

    # TALL masks: the class's computation, and the authors' construction of utils.py
    for label, tall_mask_lambda in TALL:
        try:
            quietly(TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=tall_mask_lambda).run, backbones())
            raise SystemExit("TallMaskTaskArithmeticAlgorithm ran: compare its models instead of its steps")
        except TypeError:
            # 0.2.33 stops here on every pool: its state dicts of Parameters (keep_vars=True) fail the type
            # check of state_dict_sub against its task vectors of Tensors. Its steps, on plain tensors:
            pass
        theta_0 = dict(ptm_check)
        vectors = {task: state_dict_sub(check, theta_0) for task, check in zip(tasks, ft_checks)}
        multi_task = state_dict_sum(list(vectors.values()))
        for task in tasks:
            mask = quietly(class_masks, multi_task, vectors[task], theta_0, tall_mask_lambda)
            save(state_dict_add(theta_0, state_dict_hadamard_product(mask, multi_task)), f"{label}_class_{task}")
        masks = quietly(generate_task_masks, tv_flat_checks, flat_ft, flat_ptm, merged_tv, tall_mask_lambda)
        for index, task in enumerate(tasks):
            # the authors' evaluation: the masked multi-task vector applied with coefficient 1
            save(as_state(flat_ptm + 1.0 * (merged_tv * masks[index])), f"{label}_utils_{task}")

    # Consensus: the authors' construct_consensus_mask on TALL masks saved as their code saves them
    explained = {}
    shallow = tall_mask_utils.vector_to_state_dict

    def deep_copying(function, vector, state, **options):
        return function(vector, copy.deepcopy(state), **options)

    for label, tall_mask_lambda, k, scaling_factor in CONSENSUS:
        masks = quietly(generate_task_masks, tv_flat_checks, flat_ft, flat_ptm, merged_tv, tall_mask_lambda)
        location = out / "tall_masks" / label
        (location / "tiny").mkdir(parents=True, exist_ok=True)
        torch.save({task: np.packbits(masks[index].numpy()) for index, task in enumerate(tasks)},
                   location / "tiny" / f"TALL_mask_{num_tasks}task.npy")  # fmt: skip
        config = SimpleNamespace(
            model_location=str(location).replace("tall_masks", "checkpoints"), model="tiny", num_tasks=num_tasks,
            method=SimpleNamespace(use_ties=False),
        )  # fmt: skip
        allowed = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint8"))]  # what torch.load meets
        with torch.serialization.safe_globals(allowed):
            as_it_is = quietly(construct_consensus_mask, copy.deepcopy(ptm_check), k, config, [])
            save(as_state(flat_ptm + scaling_factor * (merged_tv * as_it_is)), f"{label}_as_it_is")
            # FusionBench's vector_to_state_dict copies its reference dict shallowly and writes each task's mask
            # into the same tensors, so load_tall_mask hands back the last task's mask T times; the authors'
            # deep-copies it. The same function with the authors' helper:
            tall_mask_utils.vector_to_state_dict = partial(deep_copying, shallow)
            try:
                consensus = quietly(construct_consensus_mask, copy.deepcopy(ptm_check), k, config, [])
            finally:
                tall_mask_utils.vector_to_state_dict = shallow
            save(as_state(flat_ptm + scaling_factor * (merged_tv * consensus)), f"{label}_authors")
            last_only = (masks[-1].float() * num_tasks) >= k  # what the shallow copy counts, if that is the cause
            explained[label] = bool(torch.equal(as_it_is, last_only))
    (out / "fusionbench_consensus_explained.json").write_text(json.dumps(explained))

    # EMR-Merging: as it runs, and its election and masks with the paper's rescaler
    emr = EMRMerging().run(backbones())
    _, task_vectors = backbones().load_pretrained_model_and_task_vectors()
    paper = []
    for index, task in enumerate(tasks):
        modulator = emr.modulators[task]
        model = copy.deepcopy(emr)
        model.set_task(task)
        save(model.backbone.state_dict(), f"emr_class_{task}")
        unified = {name: emr.unified_task_vector[name] for name in emr.unified_task_vector}
        magnitude = sum(float(tau.abs().double().sum()) for tau in task_vectors[index].values())
        masked = sum(float((unified[name] * modulator.mask[name]).abs().double().sum()) for name in unified)
        paper.append(magnitude / masked)
        state = copy.deepcopy(emr.backbone.state_dict())
        rescaler = torch.tensor(paper[-1], dtype=torch.float32)
        for name in unified:
            state[name].add_(unified[name] * modulator.mask[name] * rescaler)
        save(state, f"emr_paper_{task}")
    as_it_runs = [float(emr.modulators[task].rescaler) for task in tasks]
    (out / "fusionbench_emr_rescalers.json").write_text(json.dumps({"as_it_runs": as_it_runs, "paper": paper}))


if __name__ == "__main__":
    main()
