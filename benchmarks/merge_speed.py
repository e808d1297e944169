"""Merge speed and memory: the project's merge flow on 8 (or 20) convnext-base-224-sized models.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.merge_speed [--repeats 5] [--cache /tmp/convnext-fusion-bench] [--models 8|20]
        [--flows simple_average,task_arithmetic,ties,dare_task_arithmetic,dare_ties,model_stock,mag_max,
         consensus_task_arithmetic,tall_masks,emr_merging,stream; also tsv_m,iso_c,iso_cts,wudi,cart,pcb,pcb_authors]
        [--fusionbench-python /tmp/fbvenv/bin/python] [--baseline DIR]

The first run writes ``--models`` + 1 Hugging Face checkpoint directories (``config.json`` +
``model.safetensors``) into ``--cache`` and later runs reuse them: a "pretrained" ConvNeXt of
facebook/convnext-base-224's shape (depths 3/3/27/3, widths 128-1024, random weights,
1000-class head, about 88.6M parameters, 354 MB in fp32) and ``--models`` "fine-tuned" ones
(named after the first tasks of the TALL20 benchmark, ``datamodules.tasks.BENCHMARKS``: 8 are
the eight tasks, 20 all of TALL20), each the pretrained backbone plus small Gaussian noise and
its own 10-class head.

Every measurement runs in a fresh subprocess, so peaks do not mix, and reports

* merge time: wall time from ``ModelPool({...})`` through the saved merged model on disk
  (``pool.config`` -> ``merge_backbone`` -> ``pool.head`` for each task -> ``save_merged``
  of backbone plus heads), imports excluded (they are done before the clock starts);
* peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the whole process at the end,
  imports included (``import torch`` alone is about 220 MB; the peak after the imports is
  printed as the import floor). On Linux a child's ru_maxrss starts from its parent's resident
  size at fork, so this parent never imports torch; ``VmHWM`` (the peak of the child's own
  memory map) is printed beside it as a cross-check.

Flows: ``simple_average``, ``task_arithmetic`` (lambda 0.3), ``ties`` (top_k 0.2, lambda 0.3),
``dare_task_arithmetic`` (drop_rate 0.9, rescale, seed 0, lambda 0.3) and ``dare_ties`` (the same
DARE, then TIES with top_k 0.2, lambda 0.3), the data-free ``model_stock``, ``mag_max`` (lambda 0.5),
``cart`` (rank ratio 0.12, lambda 2.0), ``wudi`` (300 Adam steps), ``pcb`` (PCB-Merging, the paper's formula, ratio 0.1,
lambda 1.2: four passes over the pool before the merge), ``pcb_authors`` (the same with the authors'
formula), ``consensus_task_arithmetic`` (lambda 0.4,
k 2, alpha 0.5), and the per-task ``tall_masks`` (lambda 0.4) and ``emr_merging``, whose time runs through
the compact merge (``merge_per_task``) and every task's backbone built once from it (what the
evaluation and the exports build; nothing is saved), through the project's code (``METHODS``), and
``stream``, a plain baseline: ``safetensors.safe_open`` one file at a time, a running fp32 sum of
the backbone, divided by 8 (no checks, no heads, no save). ``--baseline DIR`` measures the
project flows again with the ``merging`` package under ``DIR`` (another version of it, e.g. the
last commit's). With ``--fusionbench-python`` (a venv holding fusion-bench), FusionBench's own
algorithm of every selected flow it has (SimpleAverage, with and without collecting and saving
the heads; TIES; DARE task arithmetic; DARE+TIES; TSV-M, Iso-C, Iso-CTS; ``--fusionbench-flows`` picks a subset) runs on
the same directories with the same hyper-parameters, measured the same way, by
``benchmarks/fusionbench_merge.py``. FusionBench's TIES and DARE+TIES flatten every model into
one vector: their peak is near 23 GB, mind the machine's memory.

Before each measurement the flow's output directory is removed, ``os.sync()`` flushes earlier
writes and every checkpoint file is read once: each flow saves into a new directory and starts
from a warm page cache. The flows alternate ``--repeats`` times; the best and the median of each
are printed (the machine may be shared: compare figures of one run). Afterwards the saved
SimpleAverage backbones are compared with the average computed in the check (summed in
float64, as ``merging.methods.simple_average`` does), and our TIES backbone with FusionBench's
(DARE's random masks differ between the two, so their results are not compared). It measures and
prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("/tmp/convnext-fusion-bench")
NUM_CLASSES = 10
#: The tasks the flows merge, as the parent passes them to its children (comma-separated).
TASKS_ENV = "MERGE_SPEED_TASKS"


def benchmark_tasks(count: int) -> list[str]:
    """The first ``count`` tasks of TALL20 (the eight tasks first), read in a subprocess: the
    parent never imports torch (see below), which the task registry's package does."""
    code = f"import json; from datamodules.tasks import BENCHMARKS; print(json.dumps(list(BENCHMARKS['tall20'][:{count}])))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    tasks = json.loads(done.stdout.strip().splitlines()[-1])
    if len(tasks) != count:
        raise SystemExit(f"--models {count}: TALL20 has {len(tasks)} tasks")
    return tasks


def flow_tasks() -> list[str]:
    """In a child: the tasks the parent chose."""
    return os.environ[TASKS_ENV].split(",")


#: flow -> (the project's method class in ``merging.methods``, its hyper-parameters); FusionBench's
#: runs get the same hyper-parameters (``benchmarks/fusionbench_merge.py`` maps the names).
METHODS = {
    "simple_average": ("SimpleAverage", {}),
    "task_arithmetic": ("TaskArithmetic", {"scaling_factor": 0.3}),
    "ties": ("TiesMerging", {"top_k": 0.2, "scaling_factor": 0.3}),
    "dare_task_arithmetic": ("DareTaskArithmetic", {"drop_rate": 0.9, "rescale": True, "seed": 0, "scaling_factor": 0.3}),
    "dare_ties": ("DareTies", {"drop_rate": 0.9, "rescale": True, "seed": 0, "top_k": 0.2, "scaling_factor": 0.3}),
    "tsv_m": ("TaskSingularVectors", {"scaling_factor": 1.0}),
    "iso_c": ("IsotropicCommon", {"scaling_factor": 1.0}),
    "iso_cts": ("IsotropicCommonTask", {"common_space_fraction": 0.8, "scaling_factor": 1.0}),
    "model_stock": ("ModelStock", {}),
    "mag_max": ("MagMax", {"scaling_factor": 0.5}),
    "wudi": ("WUDIMerging", {"iter_num": 300}),
    "cart": ("CART", {"rank_ratio": 0.12, "scaling_factor": 2.0}),
    "consensus_task_arithmetic": ("ConsensusTaskArithmetic", {"tall_mask_lambda": 0.4, "k": 2, "scaling_factor": 0.5}),
    "tall_masks": ("TallMasks", {"tall_mask_lambda": 0.4}),
    "emr_merging": ("EMRMerging", {}),
    "pcb": ("PCBMerging", {"pcb_ratio": 0.1, "scaling_factor": 1.2}),
    "pcb_authors": ("PCBMerging", {"pcb_ratio": 0.1, "scaling_factor": 1.2, "formula": "authors"}),
}
PROJECT_FLOWS = tuple(METHODS)
#: Minutes each (an SVD per 2-D weight and task; WUDI's Adam steps; PCB's passes), so not run unless named in --flows.
SLOW_FLOWS = ("tsv_m", "iso_c", "iso_cts", "wudi", "cart", "pcb", "pcb_authors")
FUSIONBENCH_METHODS = ("simple_average", "ties", "dare_task_arithmetic", "dare_ties", "tsv_m", "iso_c", "iso_cts")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def checkpoint_dirs(cache: Path, tasks: list[str]) -> dict[str, Path]:
    """``_pretrained_`` and ``tasks`` -> their checkpoint directories in ``cache``."""
    return {"_pretrained_": cache / "pretrained", **{task: cache / task for task in tasks}}


def _written(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def complete(cache: Path, tasks: list[str]) -> bool:
    """Whether ``cache`` holds the pretrained checkpoint and every task's."""
    return all(_written(path) for path in checkpoint_dirs(cache, tasks).values())


def prepare(cache: Path, tasks: list[str]) -> None:
    """Write the checkpoints ``cache`` lacks (also ``benchmarks/adamerging_memory.py``'s); each
    fine-tuned one's noise is seeded by its name, so 8 of the 20 are the 8 of an 8-model cache."""
    if complete(cache, tasks):
        return
    dirs = checkpoint_dirs(cache, tasks)
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from datamodules import ImagePreprocessor

    missing = [name for name, directory in dirs.items() if not _written(directory)]
    print(f"writing {len(missing)} convnext-base-224-sized checkpoints to {cache} (once) ...", flush=True)
    shape = {"depths": [3, 3, 27, 3], "hidden_sizes": [128, 256, 512, 1024]}
    pretrained_dir = dirs["_pretrained_"]
    if _written(pretrained_dir):
        pretrained_config = ConvNextConfig.from_pretrained(pretrained_dir)
        state = load_file(pretrained_dir / "model.safetensors")
    else:
        torch.manual_seed(0)
        pretrained_config = ConvNextConfig(**shape, num_labels=1000)
        model = ConvNextForImageClassification(pretrained_config)
        state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    backbone = {key: value for key, value in state.items() if key.startswith("convnext.")}
    print(f"  {sum(value.numel() for value in state.values()) / 1e6:.1f}M parameters", flush=True)
    for name in missing:
        directory = dirs[name]
        directory.mkdir(parents=True, exist_ok=True)
        if name == "_pretrained_":
            tensors, config = state, pretrained_config
            ImagePreprocessor().to_processor().save_pretrained(directory)  # convnext-base-224's settings
        else:
            labels = {i: f"{name}_class_{i}" for i in range(NUM_CLASSES)}
            config = ConvNextConfig(**shape, num_labels=NUM_CLASSES, id2label=labels, label2id={v: k for k, v in labels.items()})
            generator = torch.Generator().manual_seed(int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % 2**63)
            tensors = {key: value + 1e-3 * torch.randn(value.shape, generator=generator) for key, value in backbone.items()}
            tensors["classifier.weight"] = 0.02 * torch.randn(NUM_CLASSES, 1024)
            tensors["classifier.bias"] = torch.zeros(NUM_CLASSES)
        config.save_pretrained(directory)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def warm_page_cache(dirs: dict[str, Path]) -> None:
    """Read every checkpoint file once, so each flow starts from the page cache."""
    buffer = bytearray(8 << 20)
    for directory in dirs.values():
        with open(directory / "model.safetensors", "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def output_dir(cache: Path, flow: str) -> Path:
    """Where a flow saves its merged model (``simple_average (baseline)`` -> ``simple_average-baseline``)."""
    return cache / "out" / flow.replace(" (", "-").replace(")", "").replace(" ", "-")


# ---------------------------------------------------------------- child processes


def _child_project(flow: str, cache: Path, out: Path) -> dict[str, float]:
    if os.environ.get("MERGE_SPEED_BASELINE"):  # the `merging` package of another checkout
        sys.path.insert(0, os.environ["MERGE_SPEED_BASELINE"])
    import merging
    from merging.engine import merge_backbone
    from merging.pool import PRETRAINED, ModelPool
    from merging.saved import save_merged

    name, hyperparameters = METHODS[flow]
    method = getattr(merging, name)(**hyperparameters)
    tasks = flow_tasks()
    models = {name: str(path) for name, path in checkpoint_dirs(cache, tasks).items()}
    info = {
        "method": method.describe(),
        "method_name": method.name,
        "hyperparameters": method.hyperparameters(),
        "models": models,
        "tasks": {task: {"classnames": [f"{task}_class_{i}" for i in range(NUM_CLASSES)]} for task in tasks},
    }
    floor = _peak_mib()
    start = time.perf_counter()
    pool = ModelPool(models)
    config = pool.config(PRETRAINED)
    if method.per_task:  # one backbone per task: merged compactly, then each task's built once (nothing to save)
        merged = merging.merge_per_task(pool, method, progress=False)
        for task in merged.tasks:
            merged.backbone(task)
        return {"seconds": time.perf_counter() - start, "import_floor_mib": floor}
    merged = merge_backbone(pool, method, progress=False)
    heads = {task: pool.head(task) for task in pool.task_names}
    save_merged(out, merged, heads, config, pool.directory(PRETRAINED), info, overwrite=True)
    return {"seconds": time.perf_counter() - start, "import_floor_mib": floor}


def _child_stream(cache: Path) -> dict[str, float]:
    import torch
    from safetensors import safe_open

    files = [path / "model.safetensors" for name, path in checkpoint_dirs(cache, flow_tasks()).items() if name != "_pretrained_"]
    floor = _peak_mib()
    start = time.perf_counter()
    total: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as file:
            for key in file.keys():
                if not key.startswith("convnext."):
                    continue
                tensor = file.get_tensor(key)
                if key in total:
                    total[key].add_(tensor)
                else:
                    total[key] = tensor.to(torch.float32, copy=True)
    for tensor in total.values():
        tensor.div_(len(files))
    return {"seconds": time.perf_counter() - start, "import_floor_mib": floor}


def _own_peak_mib() -> float:
    """VmHWM: the peak of this process's own memory map (a cross-check of ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(flow: str, cache: Path, out: Path) -> None:
    if flow == "prepare":
        prepare(cache, flow_tasks())
        return
    if flow == "compare":
        compare(cache, ["simple_average", "simple_average-baseline", "fusionbench", "fusionbench-no-heads"])
        compare_backbones(cache / "out" / "ties", cache / "out" / "fusionbench-ties")
        for spectral in SLOW_FLOWS:  # against FusionBench's and against the --baseline version's, where run
            compare_backbones(cache / "out" / spectral, cache / "out" / f"fusionbench-{spectral}")
            compare_backbones(cache / "out" / spectral, cache / "out" / f"{spectral}-baseline")
        return
    if os.environ.get("MERGE_SPEED_BASELINE"):
        out = out.with_name(f"{out.name}-baseline")
    result = _child_stream(cache) if flow == "stream" else _child_project(flow, cache, out)
    print(json.dumps({**result, "peak_rss_mib": _peak_mib(), "vm_hwm_mib": _own_peak_mib()}))


# ---------------------------------------------------------------- parent


def measure(command: list[str], extra_env: dict[str, str] | None = None) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(cache: Path, names: list[str]) -> None:
    """The saved SimpleAverage backbones against the average computed here (summed in float64,
    as ``merging.methods.simple_average`` defines it)."""
    import torch
    from safetensors.torch import load_file

    reference: dict[str, torch.Tensor] = {}
    tasks = flow_tasks()
    for task in tasks:
        for key, tensor in load_file(checkpoint_dirs(cache, tasks)[task] / "model.safetensors").items():
            if key.startswith("convnext."):
                reference[key] = reference[key].add_(tensor) if key in reference else tensor.double()
    for key, tensor in reference.items():
        reference[key] = tensor.div_(len(tasks)).float()
    for name in names:
        path = cache / "out" / name / "model.safetensors"
        if not path.is_file():
            continue
        saved = load_file(path)
        exact = all(torch.equal(saved[key], value) for key, value in reference.items())
        largest = max(float((saved[key] - value).abs().max()) for key, value in reference.items())
        print(
            f"  {name}: backbone {'equal to' if exact else 'differs from'} the float64-summed average (largest |diff| {largest:.3g})"
        )


def compare_backbones(ours: Path, theirs: Path) -> None:
    """The largest difference between two saved merges' ``convnext.*`` tensors (where both exist)."""
    from safetensors.torch import load_file

    if not (ours / "model.safetensors").is_file() or not (theirs / "model.safetensors").is_file():
        return
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    keys = [key for key in a if key.startswith("convnext.")]
    largest = max(float((a[key] - b[key]).abs().max()) for key in keys)
    print(f"  {ours.name} against {theirs.name}: largest |diff| of the {len(keys)} backbone tensors {largest:.3g}")


def fusionbench_flows(args: argparse.Namespace, selected: list[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """FusionBench's run of every selected flow it has, with the project's hyper-parameters."""
    script = [args.fusionbench_python, str(REPO / "benchmarks" / "fusionbench_merge.py"), "--cache", str(args.cache),
              "--tasks", os.environ[TASKS_ENV]]  # fmt: skip
    flows = {}
    chosen = args.fusionbench_flows.split(",") if args.fusionbench_flows else FUSIONBENCH_METHODS
    for flow in (flow for flow in FUSIONBENCH_METHODS if flow in selected and flow in chosen):
        name = "fusionbench" if flow == "simple_average" else f"fusionbench {flow}"
        command = [*script, "--method", flow, "--hyperparameters", json.dumps(METHODS[flow][1])]
        flows[name] = ([*command, "--out", str(output_dir(args.cache, name))], {"PYTHONPATH": ""})
        if flow == "simple_average":
            no_heads = "fusionbench (no heads)"
            flows[no_heads] = ([*command, "--no-heads", "--out", str(output_dir(args.cache, no_heads))], {"PYTHONPATH": ""})
    return flows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the checkpoints live")
    parser.add_argument(
        "--models", type=int, default=8, help="fine-tuned models to merge: the first of TALL20 (8: the eight tasks)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    default_flows = [flow for flow in PROJECT_FLOWS if flow not in SLOW_FLOWS]
    parser.add_argument(
        "--flows", default=",".join([*default_flows, "stream"]), help="comma-separated: " + ", ".join([*PROJECT_FLOWS, "stream"])
    )
    parser.add_argument("--fusionbench-python", help="python of a venv with fusion-bench installed")
    parser.add_argument(
        "--fusionbench-flows", help="FusionBench's subset of the flows (default: all it has); its TIES peaks near 23 GB"
    )
    parser.add_argument(
        "--baseline", help="a folder holding another version of the `merging` package: its three project flows are measured too"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.cache, output_dir(args.cache, args.child))
        return

    # The parent stays small and never imports torch: a child's ru_maxrss starts from the
    # parent's resident size at fork (Linux carries it across exec), so the nine checkpoints
    # are written, and the results compared, in children of their own.
    tasks = benchmark_tasks(args.models)
    os.environ[TASKS_ENV] = ",".join(tasks)  # for every child
    self_command = [sys.executable, "-m", "benchmarks.merge_speed", "--cache", str(args.cache), "--child"]
    subprocess.run([*self_command, "prepare"], cwd=REPO, check=True)
    dirs = checkpoint_dirs(args.cache, tasks)
    flows: dict[str, tuple[list[str], dict[str, str]]] = {}
    selected = list(filter(None, args.flows.split(",")))
    for flow in selected:
        flows[flow] = ([*self_command, flow], {})
        if args.baseline and flow in PROJECT_FLOWS:
            flows[f"{flow} (baseline)"] = ([*self_command, flow], {"MERGE_SPEED_BASELINE": str(Path(args.baseline).resolve())})
    if args.fusionbench_python:
        flows.update(fusionbench_flows(args, selected))
    results: dict[str, list[dict[str, float]]] = {flow: [] for flow in flows}
    for repeat in range(args.repeats):
        for flow, (command, extra_env) in flows.items():
            # Every flow saves into a new directory, with no earlier run's writes still to
            # flush (the kernel would slow this one's down), from a warm page cache.
            shutil.rmtree(output_dir(args.cache, flow), ignore_errors=True)
            os.sync()
            warm_page_cache(dirs)
            results[flow].append(measure(command, extra_env))
            last = results[flow][-1]
            print(
                f"[{repeat + 1}/{args.repeats}] {flow:34s} {last['seconds']:6.2f} s  peak {last['peak_rss_mib']:6.0f} MiB",
                flush=True,
            )
    print(
        f"\n{len(tasks)} fine-tuned + 1 pretrained convnext-base-224-sized checkpoints, warm page cache, {args.repeats} runs each"
    )
    print(
        f"{'flow':34s} {'best s':>7s} {'median s':>9s} {'peak RSS MiB (min/median)':>26s} {'VmHWM MiB':>10s} {'import floor MiB':>17s}"
    )
    for flow, runs in results.items():
        seconds = [run["seconds"] for run in runs]
        peaks = [run["peak_rss_mib"] for run in runs]
        floor = statistics.median(run["import_floor_mib"] for run in runs)
        hwm = statistics.median(run["vm_hwm_mib"] for run in runs)
        print(
            f"{flow:34s} {min(seconds):7.2f} {statistics.median(seconds):9.2f} {min(peaks):12.0f} / {statistics.median(peaks):<8.0f}"
            f"   {hwm:10.0f} {floor:12.0f}"
        )
    for flow in FUSIONBENCH_METHODS:
        theirs = "fusionbench" if flow == "simple_average" else f"fusionbench {flow}"
        if theirs in results and flow in results:
            fb, ours = results[theirs], results[flow]
            print(
                f"FusionBench / project {METHODS[flow][0]}: time x{statistics.median(r['seconds'] for r in fb) / statistics.median(r['seconds'] for r in ours):.1f} (medians), "
                f"peak RSS x{statistics.median(r['peak_rss_mib'] for r in fb) / statistics.median(r['peak_rss_mib'] for r in ours):.1f}"
            )
    print(f"parent process at the end: {_peak_mib():.0f} MiB peak RSS (what each child's ru_maxrss can start from)")
    print("check:", flush=True)
    subprocess.run([*self_command, "compare"], cwd=REPO, check=True)


if __name__ == "__main__":
    main()
