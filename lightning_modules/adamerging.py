"""AdaMerging (Yang et al., ICLR 2024) for any family of ``common.architectures`` (ConvNeXt,
ResNet, ViT, ...): learn the merging coefficients on unlabelled test images by minimising the
entropy of each task's predictions.

Merged backbone: ``theta = theta_0 + sum_t lambda_t * tau_t`` (task-wise, one lambda per
task) or ``theta_k = theta_0,k + sum_t lambda_{t,k} * tau_{t,k}`` (layer-wise, one lambda
per task and backbone tensor ``k``: every tensor the other methods merge, ``ModelPool.merge_keys``,
BatchNorm's running statistics included; its integer ``num_batches_tracked`` is the pretrained
model's). Only the lambdas train: the pretrained backbone and the task vectors are frozen tensors
on the device, once each, and every step runs the backbone with ``torch.func.functional_call`` on
the merged tensors (no model copies). The backbone runs in eval mode while the coefficients train,
as it is evaluated: the entropy minimised is that of the model that is scored (BatchNorm normalises
with the merged running statistics; FusionBench's ResNet AdaMerging runs BatchNorm in train mode,
on each batch's own statistics). Eval-mode BatchNorm is a per-channel affine map of its weights
*and* running statistics, so the merged statistics' coefficients learn too: torch's fused
``batch_norm`` refuses a gradient for them, and ``EvalBatchNorm2d`` computes the same map in
differentiable operations while the coefficients train. The training data are the tasks' test images *without labels*
(``MultiTaskDataModule`` drops the label column before any loader exists).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from callbacks.wandb_report import wandb_loggers
from common.files import check_output_location, write_files_atomically
from datamodules.errors import check_setting
from lightning_modules.backbones import backbone_from_state
from lightning_modules.evaluation import ModelPoolSpec, MultiTaskEvaluation, check_pool_up_front
from merging.coefficients import Coefficients, coefficients_heatmap, write_coefficients
from merging.engine import TaskVectors
from merging.errors import MergeError
from merging.pool import PRETRAINED, ModelPool


def prediction_entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the softmax predictions: ``-sum_c p_c log p_c``, in at least
    float32 (the bf16 logits of a mixed-precision run), float64 kept (``--trainer.precision 64-true``)."""
    log_probabilities = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(log_probabilities.exp() * log_probabilities).sum(dim=-1).mean()


class EvalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` in eval mode, ``(x - mean) / sqrt(var + eps) * weight + bias``, written in
    operations autograd differentiates with respect to the running statistics too (the fused
    kernel does not), with the same parameter and buffer names, so ``functional_call`` can hand it
    merged running statistics that carry the coefficients' graph."""

    def forward(self, input: Tensor) -> Tensor:
        if self.training or self.running_mean is None or self.running_var is None:
            return super().forward(input)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        normalised = (input - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        if self.weight is None:
            return normalised
        return normalised * self.weight.view(shape) + self.bias.view(shape)

    @classmethod
    def replacing(cls, module: nn.Module) -> None:
        """Every ``nn.BatchNorm2d`` inside ``module`` replaced by one of these, holding its tensors."""
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                layer = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                layer.load_state_dict(child.state_dict())
                layer.train(child.training).requires_grad_(False)
                setattr(module, name, layer)
            else:
                cls.replacing(child)


class AdaMerging(MultiTaskEvaluation):
    """Learn task-wise or layer-wise merging coefficients by entropy minimisation
    (``merge.py fit``), then evaluate the merged model (``merge.py test``).

    Args:
        tasks: evaluated tasks, in order (linked from ``data.task_names``).
        classnames: class names per task (linked from ``data.classnames``).
        models: the model pool (``_pretrained_`` plus one checkpoint per task), as for
            ``MergedClassifier``; every fine-tuned model of the pool is merged.
        granularity: ``layer`` (one coefficient per task and parameter tensor) or ``task``.
        init_value: initial coefficient (the paper: 0.3); within ``[clamp_min, clamp_max]``
            when ``clamp`` is on.
        lr: Adam learning rate (the paper: 1e-3).
        clamp: keep the coefficients the merge uses in ``[clamp_min, clamp_max]``.
        clamp_mode: how ``clamp`` keeps them there: ``project`` sets the stored coefficients
            back into the range after every optimizer step; ``forward`` leaves the stored values
            free and merges with their clamped copy, as the authors' code does (a value past a
            bound then gets no gradient). The written coefficients are those the merge used.
        clamp_min: lower bound of the coefficients.
        clamp_max: upper bound of the coefficients.
        coefficients: a coefficients file (``coefficients.json`` of an earlier fit) to start
            from, or to evaluate with ``merge.py test``: exactly the pool's tasks and backbone
            keys, finite numbers, within ``[clamp_min, clamp_max]`` when ``clamp`` is on.
        output_dir: where ``coefficients.json`` and ``coefficients.png`` are written after fit.
        evaluate_individual: in test, also evaluate each fine-tuned model on its own task.
        report_dir: where the test report goes.
        splits: evaluated splits, in the DataModule's loader order (linked from ``data.splits``).
    """

    def __init__(
        self,
        tasks: list[str],
        classnames: dict[str, list[str]],
        models: ModelPoolSpec,
        granularity: Literal["layer", "task"] = "layer",
        init_value: float = 0.3,
        lr: float = 1e-3,
        clamp: bool = True,
        clamp_mode: Literal["project", "forward"] = "project",
        clamp_min: float = 0.0,
        clamp_max: float = 1.0,
        coefficients: str | None = None,
        output_dir: str = "outputs/adamerging",
        evaluate_individual: bool = False,
        report_dir: str = "outputs/adamerging/report",
        splits: list[str] | None = None,
    ) -> None:
        super().__init__(tasks, classnames, report_dir, report_title=f"AdaMerging ({granularity}-wise)", splits=splits)
        check_setting(0 < lr < math.inf, "model.lr", "a positive number", lr, MergeError)
        check_setting(math.isfinite(init_value), "model.init_value", "a finite number", init_value, MergeError)
        within = -math.inf < clamp_min <= clamp_max < math.inf
        check_setting(within, "model.clamp_min", f"finite and <= model.clamp_max ({clamp_max})", clamp_min, MergeError)
        if clamp and coefficients is None:  # (a coefficients file replaces init_value, checked as it is read)
            # Outside the range, the first clamp would move it to the bound without a word.
            inside = clamp_min <= init_value <= clamp_max
            domain = f"within [model.clamp_min, model.clamp_max] = [{clamp_min:g}, {clamp_max:g}] while model.clamp is on"
            check_setting(inside, "model.init_value", domain, init_value, MergeError)
        check_output_location(output_dir, "model.output_dir")
        self.pool = ModelPool(models)
        check_pool_up_front(self.pool, self.tasks)
        self.granularity = granularity
        self.init_value = init_value
        self.lr = lr
        self.clamp = clamp
        self.clamp_mode = clamp_mode
        self.clamp_range = (clamp_min, clamp_max)
        self.coefficients_file = coefficients
        if coefficients is not None and not Path(coefficients).is_file():
            raise MergeError(f"coefficients file '{coefficients}' does not exist")
        self.output_dir = output_dir
        self.evaluate_individual = evaluate_individual
        self.row_name = f"adamerging({granularity}-wise)"
        self.merge_tasks = self.pool.task_names
        self.keys = list(self.pool.merge_keys)
        width = len(self.keys) if granularity == "layer" else 1
        self.coefficients = nn.Parameter(torch.full((len(self.merge_tasks), width), float(init_value)))
        if coefficients is not None:
            with torch.no_grad():
                # Values training could never reach (outside the clamp range) mean another run's
                # settings or a hand edit.
                bounds = self.clamp_range if clamp else None
                matrix = Coefficients.read(coefficients).matrix(self.merge_tasks, self.keys, granularity, bounds)
                self.coefficients.copy_(matrix)
        self.backbone: nn.Module | None = None
        self.task_vectors = nn.Module()

    @property
    def family(self) -> Any:
        """The pool's architecture record (``common.architectures``)."""
        return self.pool.architecture

    def build(self) -> None:
        pool = self.pool
        pool.check_backbones()
        self.check_pool(pool)
        vectors = TaskVectors(pool)
        theta0 = {key: vectors.pretrained_tensor(key) for key in self.keys}
        counters = {key: vectors.pretrained.read(key) for key in pool.counter_keys}
        self.backbone = backbone_from_state(pool.config(PRETRAINED), {**theta0, **counters}).requires_grad_(False)
        EvalBatchNorm2d.replacing(self.backbone)  # the running statistics' coefficients get a gradient
        #: checkpoint key -> name in the backbone module, for ``functional_call``.
        self.module_names = pool.architecture.checkpoint_keys(self.backbone.config)
        for index, key in enumerate(self.keys):
            # Each task vector is copied into its row of the stacked tensor as it is read (one
            # transient tensor at a time): no list of copies and no second copy by torch.stack.
            stacked = torch.empty((len(self.merge_tasks), *theta0[key].shape), dtype=torch.float32)
            for row, vector in zip(stacked, vectors.of(key, theta0[key])):
                row.copy_(vector)
            self.task_vectors.register_buffer(f"k{index}", stacked, persistent=False)
        # Identical on every rank by construction: DDP must not re-broadcast gigabytes of
        # task vectors before every forward (its default for buffers).
        self._ddp_params_and_buffers_to_ignore = [f"task_vectors.k{index}" for index in range(len(self.keys))]
        self.set_heads_and_individual(pool, self.evaluate_individual)
        self.rows[self.row_name] = nn.Module()  # the merged backbone comes in on_test_start

    def applied_coefficients(self) -> Tensor:
        """The coefficients the merge uses: the stored ones, clamped here with ``clamp_mode forward``."""
        if self.clamp and self.clamp_mode == "forward":
            return self.coefficients.clamp(*self.clamp_range)
        return self.coefficients

    def merged_parameters(self) -> dict[str, Tensor]:
        """``theta_0 + sum_t lambda_{t,k} tau_{t,k}`` for every backbone tensor ``k``."""
        lambdas = self.applied_coefficients().expand(len(self.merge_tasks), len(self.keys))
        pretrained = {**dict(self.backbone.named_parameters()), **dict(self.backbone.named_buffers())}
        merged = {}
        for index, key in enumerate(self.keys):
            name = self.module_names[key]
            vectors = getattr(self.task_vectors, f"k{index}")
            merged[name] = pretrained[name] + torch.tensordot(lambdas[:, index], vectors, dims=1)
        return merged

    def train(self, mode: bool = True) -> AdaMerging:
        """Lightning's train mode, but for the backbone, which stays in eval mode (see the module's docstring)."""
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The summed entropy of the tasks, backpropagated task by task: each task's forward and
        backward run on a detached copy of the merged weights, its gradient is added to theirs and
        its activations are freed before the next task's forward, so memory holds one task's
        activations whatever the number of tasks (one graph over all tasks held them all: 31.8 GiB
        at 8 tasks x 16 images on an H200). The coefficients' gradient is then the chain rule
        through the merge, ``dL/dlambda_{t,k} = <dL/dtheta_k, tau_{t,k}>``, as the backward of the
        returned loss (whose value is the summed entropy), so Lightning's optimiser step, DDP's
        gradient averaging and the clamping are unchanged."""
        merged = self.merged_parameters()  # its graph reaches the coefficients
        weights = {name: tensor.detach().requires_grad_() for name, tensor in merged.items()}
        gradients: dict[str, Tensor] | None = None
        total = torch.zeros((), device=self.coefficients.device)
        for task in self.tasks:
            features = self.family.features(functional_call(self.backbone, weights, (batch[task],)))
            entropy = prediction_entropy(self.heads(features, task))
            # A tensor the forward never reads (DINOv2's mask_token, for masked pre-training) has a zero gradient.
            task_gradients = torch.autograd.grad(entropy, list(weights.values()), materialize_grads=True)
            if gradients is None:
                gradients = dict(zip(weights, task_gradients))
            else:
                for name, gradient in zip(weights, task_gradients):
                    gradients[name].add_(gradient)
            entropy = entropy.detach()
            # Each rank holds its share of the step's images: the mean over ranks is the
            # entropy of the whole step, what one process logs (equal shares by construction).
            self.log(f"train/entropy/{task}", entropy, sync_dist=True)
            total = total + entropy
        self.log("train/entropy", total, prog_bar=True, sync_dist=True)
        through_merge = sum((merged[name] * gradients[name]).sum() for name in merged)
        return through_merge - through_merge.detach() + total

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Clamp right after the update, inside the step: callbacks' on_train_batch_end
        # (ModelCheckpoint among them) run before the module's, and must see clamped values,
        # or a run resumed from a checkpoint would start from unclamped coefficients.
        super().optimizer_step(*args, **kwargs)
        if self.clamp and self.clamp_mode == "project":
            with torch.no_grad():
                self.coefficients.clamp_(*self.clamp_range)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.coefficients], lr=self.lr)

    def coefficient_table(self) -> dict[str, dict[str, float]]:
        values = self.applied_coefficients().detach().cpu().expand(len(self.merge_tasks), len(self.keys))
        return {task: dict(zip(self.keys, row.tolist())) for task, row in zip(self.merge_tasks, values)}

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        output = Path(self.output_dir)
        applied = self.applied_coefficients().detach().cpu()
        tasks, keys = self.merge_tasks, self.keys
        writers = {  # both files or neither
            "coefficients.json": partial(write_coefficients, coefficients=applied, tasks=tasks, keys=keys, granularity=self.granularity),
            "coefficients.png": partial(coefficients_heatmap, coefficients=applied, tasks=tasks, keys=keys,
                                        network_keys=[key for key in self.pool.network_keys if key in set(keys)]),
        }  # fmt: skip
        write_files_atomically(output, writers, "model.output_dir")
        print(f"wrote {output / 'coefficients.json'} and {output / 'coefficients.png'}")
        for logger in wandb_loggers(self.trainer):
            logger.log_image(key="adamerging/coefficients", images=[str(output / "coefficients.png")])

    def on_test_start(self) -> None:
        keys = {name: key for key, name in self.module_names.items()}
        with torch.no_grad():
            merged = {keys[name]: tensor.detach().clone() for name, tensor in self.merged_parameters().items()}
        self.verify_identical_across_ranks(merged, "merged weights")
        state = {**self.family.backbone_state(self.backbone), **merged}  # the counters: the pretrained model's
        self.rows[self.row_name] = backbone_from_state(self.pool.config(PRETRAINED), state)

    def report_extra(self) -> dict[str, Any]:
        return {
            "method": self.row_name,
            "models": dict(self.pool.sources),
            # The file evaluated (``--model.coefficients``); only after a fit in this process the output.
            "coefficients": self.coefficient_table()
            if self.granularity == "task"
            else self.coefficients_file or str(Path(self.output_dir, "coefficients.json")),
        }
