"""The diagonal Fisher information of a fine-tuned classifier, gathered on unlabelled images (Fisher merging).

For an image ``x`` and the classifier's predicted distribution ``p = softmax(z(x))`` (the
fine-tuned backbone and its own task's head; no label is read), the statistic is FusionBench
0.2.33's (``fusion_bench.method.fisher_merging``, from MergeLM): the squared gradient, with
respect to every backbone parameter ``theta``, of

    s(x) = sum_c sqrt(p_c) log p_c      (``sqrt(p_c)`` held constant: detached)

so ``(d s / d theta)^2 = (sum_c sqrt(p_c) d log p_c / d theta)^2``. The target is thus neither
the predicted label nor a sampled one: every class enters, weighted by ``sqrt(p_c)`` inside the
square (the cross terms between classes stay; the exact Fisher ``sum_c p_c (d log p_c)^2`` would
need one backward per class). The diagonal Fisher of task ``t`` over its ``N`` images is

    F_t = (1/N) sum_x (d s(x) / d theta)^2,

one squared gradient *per image*. FusionBench squares the gradient of a whole batch's sum
instead, which adds cross terms between the images of a batch and makes ``F_t`` depend on the
batch size and on how the images fall into batches (and so on the number of processes); per
image is its estimator at batch size 1, and the same whatever the batches and processes. The
per-image gradients come from ``torch.func`` (``vmap`` of ``grad`` over ``functional_call``),
a chunk of images at a time (``CHUNK_ENTRIES``).

Sums, not means, so that they add up over batches and, with ``merging.grams.all_reduce_sum``,
over processes (RegMean's Grams are reduced the same way): N processes that each see a disjoint
part of the images hold, once reduced, the sums of one process that saw them all.
``mean_fishers`` divides by the images at the end.

Only parameters have a Fisher. Buffers (a ResNet's BatchNorm running means and variances, its
``num_batches_tracked``) get no gradient and no entry here; a parameter the forward never reads
(DINOv2's ``mask_token``) gets a zero Fisher.

This module is the math, with no Lightning; ``lightning_modules.gram_pass`` runs it over the
``gram`` images inside ``merge.py test``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from common.architectures import architecture_of
from merging.errors import MergeError
from merging.grams import all_reduce_sum

#: Per-image gradients held at once, in entries (4 GiB of float32): images go through the
#: gradient in chunks of ``max(1, CHUNK_ENTRIES // parameters)`` (12 for a convnext-base, whose
#: backbone has 87.6 M parameters).
CHUNK_ENTRIES = 1 << 30


def fisher_target(logits: Tensor) -> Tensor:
    """``sum_c sqrt(p_c) log p_c`` summed over the rows of ``logits``, ``sqrt(p)`` detached."""
    log_probabilities = torch.log_softmax(logits, dim=-1)
    return (log_probabilities.detach().exp().sqrt() * log_probabilities).sum()


class FisherAccumulator(nn.Module):
    """Runs a fine-tuned classifier (``backbone`` and its task's ``head``) on images and sums, per
    backbone parameter, the squared per-image gradient of ``fisher_target``.

    Args:
        backbone: a frozen backbone of a family (``ConvNextModel``, ``ViTModel``, ...), in eval
            mode; it becomes a submodule (moved with it).
        head: the task's ``nn.Linear`` on the family's features (``common.architectures``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head.requires_grad_(False)
        self.architecture = architecture_of(backbone.config)
        keys = {name: key for key, name in self.architecture.checkpoint_keys(backbone.config).items()}
        names = [name for name, _ in backbone.named_parameters()]
        #: the checkpoint key of each parameter (``convnext.encoder...``), in the network's order.
        self.keys = [keys[name] for name in names]
        self._names = names
        # Allocated on the first images, on their device, outside inference mode.
        self.sums: list[Tensor | None] = [None] * len(names)
        self.images = 0
        self.chunk = max(1, CHUNK_ENTRIES // max(1, sum(p.numel() for p in backbone.parameters())))

    def dtype(self) -> torch.dtype:
        """Of the sums: the backbone's, at least float32."""
        return torch.promote_types(next(self.backbone.parameters()).dtype, torch.float32)

    def _target(self, parameters: dict[str, Tensor], image: Tensor) -> Tensor:
        outputs = functional_call(self.backbone, parameters, args=(), kwargs={"pixel_values": image.unsqueeze(0)})
        return fisher_target(self.head(self.architecture.features(outputs)))

    def forward(self, images: Tensor) -> None:
        # Lightning's test loop runs in inference mode, where nothing is differentiated: the
        # gradients, and the sums they add to, live outside it.
        with torch.inference_mode(False), torch.enable_grad():
            images = images.clone()  # an ordinary tensor (the loader's may be an inference tensor)
            parameters = {name: p.detach() for name, p in self.backbone.named_parameters()}
            per_image = vmap(grad(self._target), in_dims=(None, 0))
            for chunk in images.split(self.chunk):
                gradients = per_image(parameters, chunk)
                for index, name in enumerate(self._names):
                    squares = gradients[name].to(self.dtype()).square().sum(0)
                    if self.sums[index] is None:
                        self.sums[index] = squares
                    else:
                        self.sums[index].add_(squares)
        self.images += images.shape[0]

    def reduced_sums(self, device: torch.device) -> tuple[list[Tensor], int]:
        """``(sums, images)`` over every process (zeros where this one saw no image)."""
        dtype = self.dtype()
        parameters = [p for _, p in self.backbone.named_parameters()]
        sums = [s if s is not None else torch.zeros(p.shape, dtype=dtype, device=device) for s, p in zip(self.sums, parameters)]
        for total in sums:
            all_reduce_sum(total)
        count = torch.tensor([self.images], dtype=torch.int64, device=device)
        all_reduce_sum(count)
        return sums, int(count.item())


def mean_fishers(sums: list[Tensor], images: int, task: str) -> list[Tensor]:
    """``F_t = sums / N`` per parameter (in place); a task that saw no image is an error naming it."""
    if images == 0:
        raise MergeError(f"the Fisher pass read no image of task '{task}' (trainer.limit_test_batches?)")
    for total in sums:
        total.div_(images)
    return sums
