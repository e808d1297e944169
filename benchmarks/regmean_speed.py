"""RegMean's cost on the CPU or one GPU: the Gram pass (images/s) and the closed-form merge of eight
convnext-base-224-sized checkpoints.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.regmean_speed [--batches 3] [--batch-size 8]
        [--cache /tmp/convnext-fusion-bench] [--models tiny,base] [--skip-merge] [--device cpu|cuda]

Gram pass: a random ``ConvNextModel`` (``tiny``: depths 1/1/1/1, widths 8-64; ``base``:
facebook/convnext-base-224's shape, depths 3/3/27/3, widths 128-1024) in eval mode without
gradients, on random 224x224 inputs; images/s of the plain forward and of the same forward
through ``merging.grams.GramAccumulator`` (a hook on every ``pwconv1``/``pwconv2`` adding
``X^T X`` of its inputs, float32), each the best of ``--batches`` timed batches after one
warm-up batch; and the memory of one model's Grams.

Merge: the nine checkpoints of ``benchmarks/merge_speed.py`` (written once into ``--cache``);
per Linear weight a symmetric positive-definite Gram ``A A^T / 64 + I`` (``A``: in x 64), the
same tensor for all eight tasks (the closed form costs the same whatever the values; eight
distinct sets would hold 5.7 GB of RAM). Timed: ``merge_backbone(pool, RegMean(0.95),
grams=...)`` (every other parameter averaged) beside ``merge_backbone(pool, SimpleAverage())``,
and the process's peak RSS. With ``--device cuda`` the Gram pass runs on the GPU and the Grams
live there, so the closed form is solved there too (as in a ``merge.py`` run on a GPU); the
checkpoints are still read on the CPU. It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextModel

from benchmarks.merge_speed import DEFAULT_CACHE, checkpoint_dirs, prepare
from merging.grams import GramAccumulator, linear_layers

SHAPES = {
    "tiny": {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64]},
    "base": {"depths": [3, 3, 27, 3], "hidden_sizes": [128, 256, 512, 1024]},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(run, images: torch.Tensor, batches: int) -> float:
    """Best of ``batches`` timed calls after one warm-up."""
    run(images)
    best = float("inf")
    for _ in range(batches):
        synchronize(images.device)
        start = time.perf_counter()
        run(images)
        synchronize(images.device)
        best = min(best, time.perf_counter() - start)
    return images.shape[0] / best


def gram_pass(shape: str, batch_size: int, batches: int, device: torch.device) -> None:
    torch.manual_seed(0)
    backbone = ConvNextModel(ConvNextConfig(**SHAPES[shape])).eval().to(device)
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    gram_bytes = sum(layer.in_features**2 * 4 for layer in linear_layers(backbone).values())
    with torch.no_grad():
        plain = images_per_second(lambda x: backbone(pixel_values=x), images, batches)
        accumulator = GramAccumulator(backbone)
        hooked = images_per_second(accumulator, images, batches)
    print(
        f"{shape:5s} 224 px, batch {batch_size}: forward {plain:8.2f} images/s, Gram pass {hooked:8.2f} images/s "
        f"({plain / hooked:.2f}x the forward's time); Grams {gram_bytes / 2**20:.1f} MiB per model"
    )


def spd_grams(dims: dict[str, int], num_tasks: int, device: torch.device) -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    grams = {}
    for key, dim in dims.items():
        factor = torch.randn(dim, 64, generator=generator)
        gram = factor @ factor.T / 64 + torch.eye(dim)
        grams[key] = [gram.to(device)] * num_tasks
    return grams


def merge_time(cache: Path, device: torch.device) -> None:
    from datamodules.tasks import BENCHMARK_TASKS
    from merging.engine import merge_backbone
    from merging.methods import SimpleAverage
    from merging.pool import ModelPool
    from merging.regmean import RegMean

    prepare(cache, list(BENCHMARK_TASKS))
    models = {name: str(path) for name, path in checkpoint_dirs(cache, list(BENCHMARK_TASKS)).items()}
    pool = ModelPool(models)
    with torch.device("meta"):
        layers = linear_layers(ConvNextModel(pool.config()))
    grams = spd_grams({key: layer.in_features for key, layer in layers.items()}, len(pool.task_names), device)
    print(
        f"merge of {len(pool.task_names)} checkpoints: {len(grams)} Linear weights from Grams, {len(pool.backbone_keys) - len(grams)} other tensors averaged"
    )
    for label, method, extra in [("SimpleAverage", SimpleAverage(), {}), ("RegMean(0.95)", RegMean(0.95), {"grams": grams})]:
        start = time.perf_counter()
        merge_backbone(pool, method, progress=False, **extra)
        synchronize(device)
        print(f"  {label:14s} {time.perf_counter() - start:7.2f} s")
    print(
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (Grams of one model held once: see above)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3, help="timed batches per measurement (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", default="tiny,base", help="Gram-pass model shapes, comma-separated: tiny, base")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the merge benchmark's checkpoints (written once)")
    parser.add_argument("--skip-merge", action="store_true", help="the Gram pass only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}")
    for shape in args.models.split(","):
        gram_pass(shape, args.batch_size, args.batches, device)
    if not args.skip_merge:
        merge_time(args.cache, device)


if __name__ == "__main__":
    main()
