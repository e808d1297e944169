"""RegMean++ (Nguyen, Huu-Tien, Suzuki and Nguyen, "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean
for Model Merging", TMLR 2026, arXiv 2508.03121): RegMean whose Gram matrices for a block come from the *merged*
model's activations, the blocks before it already merged, block after block.

The order is FusionBench 0.2.33's (``fusion_bench.method.regmean_plusplus``), which merges a CLIP
vision model layer by layer (a "layer" is one transformer block):

1. The tensors outside the blocks (embeddings, ConvNeXt's downsampling layers, the final norm) are the
   simple average of the fine-tuned ones. (FusionBench averages the embeddings and the norm before the
   first layer; its CLIP subclass leaves the norm after the last layer, ``post_layernorm``, at the
   pretrained model's, a tensor no Gram concerns: here it is averaged like every other such tensor.)
2. For each block ``l`` in the network's order, for each task ``t``: task ``t``'s images run through
   the merged model up to block ``l`` (its blocks before ``l`` merged, its other tensors averaged) and
   through *model t's own* block ``l``, whose ``nn.Linear`` layers sum ``X^T X`` of their inputs
   (``merging.grams``' hooks: every row of every image; ``G = X^T X / N`` per layer, summed over
   processes with ``merging.grams.all_reduce_sum`` before the division, so any number of processes
   gives the Grams of one). Inside the block the inputs of its later Linear layers are thus model t's
   own activations on the merged model's block input, as in FusionBench, which runs each fine-tuned
   layer on the merged layers' outputs.
3. Block ``l``'s Linear weights are RegMean's closed form on those Grams (``merging.regmean.regmean``,
   the same shrink ``a G + (1 - a) diag(G)`` and float64 solve), its other tensors (biases, norms,
   depthwise convolutions, layer scale) the simple average; the merged block then serves the next.

The blocks of a family's backbone (``backbone_blocks``) are found from its module tree: the modules
that hold ``nn.Linear`` layers and are not containers of such blocks, where a container is a module
holding an ``nn.ModuleList`` whose elements hold Linear layers. That gives each of ConvNeXt's and
ConvNeXt-V2's ``encoder.stages.<s>.layers.<j>``, ViT's ``layers.<i>``, DINOv2's ``encoder.layer.<i>``,
and Swin's ``encoder.layers.<s>.blocks.<j>`` and ``encoder.layers.<s>.downsample`` (the patch merging,
its own block); a ResNet has no Linear layer, so RegMean++ is the simple average there, said in one
line before merging.

The images are decoded once: the data pass keeps each task's preprocessed batches on the device
(``3 x 224 x 224`` float32 per image: 147 MiB per task at 256 images, 1.15 GiB for eight, on each
process its share) and the merged model is run from the pixels again for every block and task, to
that block only (a hook stops the forward there). That is ``T`` forwards of the prefix per block,
about ``T L / 2`` full forwards for ``L`` blocks of similar cost (ConvNeXt's blocks are: each stage
halves the resolution and doubles the width), against FusionBench's ``T`` (it keeps every image's
activations at the current layer's input instead, in CPU memory: for a convnext-base 1.5 MiB per image
at the first stage, 3 GiB for eight tasks of 256). Memory beyond the images: the merged backbone and
one block of each fine-tuned model, on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from rich.progress import track
from torch import Tensor, nn
from torch.func import functional_call

from common.architectures import architecture_of
from merging.errors import MergeError
from merging.grams import all_reduce_sum
from merging.methods import MergeMethod, register_method, simple_average
from merging.regmean import regmean


@dataclass
class ImageBatches:
    """Each task's preprocessed unlabelled train images, as this process read them (its share; a task
    it read none of has an empty list), on ``device`` in ``dtype``: the forwards run there."""

    batches: Mapping[str, Sequence[Tensor]]
    device: torch.device
    dtype: torch.dtype = torch.float32


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(layer, nn.Linear) for layer in module.modules())


def _holds_blocks(module: nn.Module) -> bool:
    """A container of blocks: an ``nn.ModuleList`` in it (itself included) has an element with a Linear."""
    return any(
        isinstance(inner, nn.ModuleList) and any(_has_linear(element) for element in inner.children())
        for inner in module.modules()
    )


def backbone_blocks(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module name, module)`` of every block of ``backbone`` (see the module docstring), in the
    order of the module tree, which is the forward's in every supported family."""
    blocks: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if not _has_linear(child):
                continue
            if _holds_blocks(child):
                visit(f"{prefix}{name}.", child)
            else:
                blocks.append((f"{prefix}{name}", child))

    visit("", backbone)
    return blocks


class _BlockDone(Exception):
    """Raised by a hook once the block whose Grams are gathered has run: the rest of the forward is not needed."""


def _stop(module: nn.Module, args: tuple, output: object) -> None:
    raise _BlockDone


class _BlockGrams:
    """``X^T X`` and row counts of the inputs of a block's Linear layers, summed while hooked."""

    def __init__(self, linears: Mapping[str, nn.Linear], dtype: torch.dtype, device: torch.device) -> None:
        self.keys = list(linears)
        self.sums = [torch.zeros(m.in_features, m.in_features, dtype=dtype, device=device) for m in linears.values()]
        self.rows = [0] * len(self.keys)
        self.handles = [m.register_forward_pre_hook(partial(self._record, i)) for i, m in enumerate(linears.values())]

    def _record(self, index: int, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        rows = args[0].detach().reshape(-1, args[0].shape[-1]).to(self.sums[index].dtype)
        self.sums[index].addmm_(rows.T, rows)
        self.rows[index] += rows.shape[0]

    def means(self, task: str) -> list[Tensor]:
        """``X^T X / N`` per layer over every process; removes the hooks."""
        for handle in self.handles:
            handle.remove()
        for total in self.sums:
            all_reduce_sum(total)
        counts = torch.tensor(self.rows, dtype=torch.int64, device=self.sums[0].device)
        all_reduce_sum(counts)
        for key, total, count in zip(self.keys, self.sums, counts.tolist()):
            if count == 0:
                raise MergeError(f"no input reached '{key}' in RegMean++'s pass of task '{task}' (no image of it read?)")
            total.div_(count)
        return self.sums


def regmean_plusplus_merge(
    pool: object, images: ImageBatches, reduce_non_diagonal_ratio: float, progress: bool = True, describe: str = "regmean++"
) -> dict[str, Tensor]:
    """RegMean++ of ``pool`` (a ``merging.ModelPool``) on ``images``: the merged backbone's tensors
    under their checkpoint keys, in the pretrained dtype (float32 results), on the CPU.

    Every process calls it with its share of the images and gets the same tensors (the Grams are summed
    over processes, in the same order everywhere)."""
    from merging.engine import merge_backbone  # the engine dispatches here: imported when called
    from merging.methods import SimpleAverage

    missing = [task for task in pool.task_names if task not in images.batches]
    if missing:
        raise MergeError(f"RegMean++ has no images of task(s) {', '.join(missing)}")
    merged = merge_backbone(pool, SimpleAverage(), progress=False)  # every tensor read and checked once
    config = pool.config()
    record = architecture_of(config)
    names = record.checkpoint_keys(config)  # checkpoint key -> module name
    keys = {name: key for key, name in names.items()}
    work = record.backbone_from_state(config, merged).to(images.device, images.dtype).eval()
    blocks = backbone_blocks(work)
    if not blocks and progress:
        print(
            f"{describe} on this {record.name} backbone: none of its layers is an nn.Linear (its layers are convolutions), "
            "so no Gram matrix is used and every tensor is the simple average: this merge is the simple average"
        )
    readers = {task: pool.reader(task) for task in pool.task_names}
    gram_dtype = torch.promote_types(images.dtype, torch.float32)
    for block_name, block in track(blocks, description=f"merging ({describe})", transient=True, disable=not progress):
        parameters = [f"{block_name}.{name}" for name, _ in block.named_parameters()]
        linears = {
            keys[f"{block_name}.{name}.weight"]: module for name, module in block.named_modules() if isinstance(module, nn.Linear)
        }
        grams: dict[str, list[Tensor]] = {key: [] for key in linears}
        for task in pool.task_names:
            own = {name: readers[task].read(keys[name]).to(images.device, images.dtype) for name in parameters}
            sums = _BlockGrams(linears, gram_dtype, images.device)
            stop = block.register_forward_hook(_stop)
            try:
                with torch.no_grad():
                    for batch in images.batches[task]:
                        try:
                            functional_call(work, own, args=(), kwargs={"pixel_values": batch.to(images.dtype)})
                        except _BlockDone:
                            pass
            finally:
                stop.remove()
            for key, gram in zip(sums.keys, sums.means(task)):
                grams[key].append(gram)
        for key in linears:
            try:
                weights = (readers[task].read(key) for task in pool.task_names)
                merged[key] = regmean(weights, grams[key], reduce_non_diagonal_ratio).cpu().to(merged[key].dtype)
            except torch.linalg.LinAlgError as error:
                raise MergeError(f"merging '{key}' with {describe}: the summed Gram matrix is singular ({error})") from error
            if not torch.isfinite(merged[key]).all():
                raise MergeError(f"merging '{key}' gave non-finite values (overflow) with {describe}")
        with torch.no_grad():  # the merged block, for the blocks after it
            state = dict(work.named_parameters())
            for name in parameters:
                state[name].copy_(merged[keys[name]])
    return merged


@register_method
class RegMeanPlusPlus(MergeMethod):
    """RegMean++ (Nguyen et al., arXiv 2508.03121): RegMean block after block, each block's Gram
    matrices from the merged model's own activations (the blocks before it merged) through each
    fine-tuned model's block, on its task's unlabelled train images; every tensor outside the blocks
    the simple average (see ``merging.regmean_plusplus``). Needs the images: set ``data.gram_images``.

    Args:
        reduce_non_diagonal_ratio: ``a`` in ``G~ = a G + (1 - a) diag(G)``, as RegMean's (FusionBench's
            name; its CLIP default is 0.95).
    """

    name = "regmean_plusplus"
    uses_pretrained = False
    needs_images = True

    def __init__(self, reduce_non_diagonal_ratio: float = 0.95) -> None:
        if not 0 <= reduce_non_diagonal_ratio <= 1:
            raise MergeError(f"reduce_non_diagonal_ratio must be in [0, 1], got {reduce_non_diagonal_ratio}")
        self.reduce_non_diagonal_ratio = reduce_non_diagonal_ratio

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"reduce_non_diagonal_ratio": self.reduce_non_diagonal_ratio}

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return simple_average(tensors)

    def merge_with_images(self, pool: object, images: ImageBatches, progress: bool) -> dict[str, Tensor]:
        return regmean_plusplus_merge(pool, images, self.reduce_non_diagonal_ratio, progress, self.describe())
