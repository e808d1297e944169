"""The architecture record: what differs between the Hugging Face image-classifier families, in
one place. Everything else asks the record of a checkpoint's ``config.model_type``.

A family is a ``*ForImageClassification`` class of transformers: a backbone (its
``base_model_prefix`` submodule, ``convnext``, ``resnet``, ``vit``, ...) and a classification
head on features the backbone's output gives. The record holds, per family:

- the backbone's key prefix in a classifier checkpoint (``base_model_prefix`` + ``.``) and the
  names its tensors have there (``checkpoint_keys``: transformers 5 names some modules otherwise
  in memory than in the files, ViT's ``encoder.layer.0.attention.attention.query`` is
  ``layers.0.attention.q_proj``; the files keep the hub's names, and so does this project);
- the head's keys (``classifier.weight``; ResNet's ``nn.Sequential(Flatten, Linear)``:
  ``classifier.1.weight``) and how to build a fresh head for ``num_labels`` (``new_head``);
- how the head's input comes from the backbone's output (``features``): ConvNeXt, ConvNeXt-V2
  and Swin the pooled output, ResNet the pooled output flattened (it is ``(B, C, 1, 1)``), ViT the
  CLS token after the final layer norm, DINOv2 the CLS token concatenated with the mean of the
  patch tokens, exactly as each ``*ForImageClassification.forward`` computes it;
- what its image processor does (``preprocessing``, for the README and the reports; the pixels
  themselves are ``datamodules.preprocessing``'s job, read from the checkpoint's
  ``preprocessor_config.json``).

Families: ConvNeXt (the default everywhere), ConvNeXt-V2, ResNet, ViT, DINOv2, Swin. A
``model_type`` of none of them is one ``CheckpointError`` naming the supported families.
Adding one is one more ``Architecture`` in ``ARCHITECTURES`` (``CONTRIBUTING.md``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    ConvNextForImageClassification,
    ConvNextModel,
    ConvNextV2ForImageClassification,
    ConvNextV2Model,
    Dinov2ForImageClassification,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
    ResNetForImageClassification,
    ResNetModel,
    SwinForImageClassification,
    SwinModel,
    ViTForImageClassification,
    ViTModel,
)
from transformers.core_model_loading import revert_weight_conversion

from common.errors import CheckpointError

#: The family every default names (``facebook/convnext-base-224``, the recipe, the reference configs).
DEFAULT_MODEL_TYPE = "convnext"


def pooled(outputs: Any) -> Tensor:
    """The backbone's pooled output, ``(B, C)`` (ConvNeXt, ConvNeXt-V2, Swin)."""
    return outputs.pooler_output


def pooled_flat(outputs: Any) -> Tensor:
    """The pooled output flattened: ResNet's is ``(B, C, 1, 1)`` (its head starts with ``Flatten``)."""
    return outputs.pooler_output.flatten(1)


def cls_token(outputs: Any) -> Tensor:
    """The CLS token of the last hidden state, which ViT's final layer norm has normalised."""
    return outputs.last_hidden_state[:, 0]


def cls_and_mean_patch(outputs: Any) -> Tensor:
    """``cat(CLS, mean of the patch tokens)`` of the (normalised) last hidden state, ``(B, 2C)``:
    DINOv2's classifier input."""
    hidden = outputs.last_hidden_state
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)


def _last_hidden_size(config: PretrainedConfig) -> int:
    return int(config.hidden_sizes[-1])


def _hidden_size(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def _twice_hidden_size(config: PretrainedConfig) -> int:
    return 2 * int(config.hidden_size)


def _swin_features(config: PretrainedConfig) -> int:
    return int(config.embed_dim * 2 ** (len(config.depths) - 1))


@dataclass(frozen=True)
class Architecture:
    """One image-classifier family of transformers.

    Args:
        model_type: ``config.model_type`` of its checkpoints (the lookup key).
        name: how messages and tables name it.
        classifier_class: its ``*ForImageClassification``.
        backbone_class: its base model (what ``classifier_class`` holds under ``base_model_prefix``).
        features: the head's input from the backbone's output (see the module docstring).
        feature_size: the size of that input, from the config.
        head_module: the head's ``nn.Linear`` in a classifier checkpoint (``classifier`` or ResNet's
            ``classifier.1``).
        reference_checkpoint: the hub checkpoint a run of this family starts from.
        preprocessing: what its image processor does, in words.
        backbone_options: keyword arguments of ``backbone_class`` that make it the classifier's
            own backbone (ViT's classifier has no pooler: ``add_pooling_layer=False``).
    """

    model_type: str
    name: str
    classifier_class: type[PreTrainedModel]
    backbone_class: type[PreTrainedModel]
    features: Callable[[Any], Tensor]
    feature_size: Callable[[PretrainedConfig], int]
    head_module: str
    reference_checkpoint: str
    preprocessing: str
    backbone_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """The backbone's key prefix in a classifier checkpoint: ``base_model_prefix`` and a dot."""
        return f"{self.classifier_class.base_model_prefix}."

    @property
    def head_keys(self) -> tuple[str, str]:
        """The head's weight and bias keys in a classifier checkpoint."""
        return f"{self.head_module}.weight", f"{self.head_module}.bias"

    @property
    def class_names(self) -> tuple[str, str]:
        """The ``architectures`` a checkpoint of this family may name: the classifier, the bare backbone."""
        return self.classifier_class.__name__, self.backbone_class.__name__

    def is_head_key(self, key: str) -> bool:
        """A key of the classifier's head (``classifier.*``), not of the backbone."""
        return key.split(".")[0] == self.head_module.split(".")[0]

    def new_head(self, config: PretrainedConfig, num_labels: int) -> nn.Module:
        """A freshly initialised head for ``num_labels`` classes, laid out as the family's classifier
        holds it (``nn.Linear``; ResNet: ``nn.Sequential(nn.Flatten(), nn.Linear)``)."""
        linear = nn.Linear(self.feature_size(config), num_labels)
        return nn.Sequential(nn.Flatten(), linear) if self.head_module.endswith(".1") else linear

    def replace_head(self, model: PreTrainedModel, num_labels: int) -> None:
        """Give a classifier a fresh head (``new_head``) for ``num_labels`` classes, in place."""
        setattr(model, self.head_module.split(".")[0], self.new_head(model.config, num_labels))

    def head_linear(self, model: PreTrainedModel) -> nn.Linear:
        """The ``nn.Linear`` of a classifier's head."""
        return model.get_submodule(self.head_module)

    def backbone_of(self, model: PreTrainedModel) -> PreTrainedModel:
        """The backbone of a classifier (its ``base_model_prefix`` submodule)."""
        return getattr(model, self.classifier_class.base_model_prefix)

    def build_backbone(self, config: PretrainedConfig) -> PreTrainedModel:
        """A backbone of ``config`` (in the current ``torch.device`` context), as the classifier holds it."""
        return self.backbone_class(config, **self.backbone_options)

    def checkpoint_keys(self, config: PretrainedConfig) -> dict[str, str]:
        """The backbone's tensors of ``config``: key in a classifier checkpoint (``vit.encoder.layer.0.
        attention.attention.query.weight``) -> name in the backbone module (``layers.0.attention.
        q_proj.weight``), in the network's order (input to output). transformers' own reverse of
        its load-time renaming (what ``save_pretrained`` writes) gives the checkpoint's names."""
        return {key: name for key, name, _ in _checkpoint_keys(self.model_type, config.to_json_string(use_diff=False))}

    def checkpoint_shapes(self, config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
        """``checkpoint_keys``' keys with the shape ``config`` gives each tensor."""
        return {key: shape for key, _, shape in _checkpoint_keys(self.model_type, config.to_json_string(use_diff=False))}

    def backbone_from_state(self, config: PretrainedConfig, state: Mapping[str, Tensor]) -> PreTrainedModel:
        """A backbone of ``config`` holding ``state`` (checkpoint keys, ``convnext.*``: every one of
        the backbone's, no other), built without a random init, in eval mode."""
        names = self.checkpoint_keys(config)
        unknown = sorted(set(state) - set(names))
        missing = sorted(set(names) - set(state))
        if unknown or missing:
            detail = f"unexpected {unknown[:3]}" if unknown else f"missing {missing[:3]}"
            raise CheckpointError(f"a {self.name} backbone of this config does not take these tensors: {detail}")
        module_state = {names[key]: tensor for key, tensor in state.items()}
        with torch.device("meta"):
            model = self.build_backbone(config)
        model.load_state_dict(module_state, assign=True, strict=True)
        if any(buffer.is_meta for buffer in model.buffers()):
            # A buffer the checkpoint does not store (Swin's relative_position_index, computed in
            # __init__) stayed on the meta device: build the backbone for real, where the state lives.
            with torch.device(next(iter(state.values())).device):
                model = self.build_backbone(config)
            model.load_state_dict(module_state, strict=True)
        return model.eval()

    def backbone_state(self, backbone: nn.Module) -> dict[str, Tensor]:
        """A backbone module's tensors under their checkpoint keys (``backbone_from_state``'s inverse)."""
        module_state = backbone.state_dict()
        return {key: module_state[name] for key, name in self.checkpoint_keys(backbone.config).items()}

    def head_state(self, head: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"weight", "bias"}`` of a head under its keys in a classifier checkpoint."""
        weight, bias = self.head_keys
        return {weight: head["weight"], bias: head["bias"]}


@lru_cache(maxsize=32)
def _checkpoint_keys(model_type: str, config_json: str) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """``(checkpoint key, module name, shape)`` of every backbone tensor, in the network's order."""
    record = ARCHITECTURES[model_type]
    config = record.classifier_class.config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):  # names and shapes only: nothing allocated, nothing initialised
        backbone = record.build_backbone(config)
    state = backbone.state_dict()
    names = list(state)
    # Each tensor a distinct index, so the renamed keys can be matched with the module's names.
    reverted = revert_weight_conversion(backbone, {name: torch.tensor(index) for index, name in enumerate(names)})
    mapping = {record.prefix + key: names[int(value)] for key, value in reverted.items()}
    if sorted(mapping.values()) != sorted(names):
        raise CheckpointError(f"cannot name the {record.name} backbone's tensors as its checkpoints do")
    order = {name: index for index, name in enumerate(names)}
    entries = sorted(mapping.items(), key=lambda item: order[item[1]])
    return tuple((key, name, tuple(state[name].shape)) for key, name in entries)


_IMAGENET = "ImageNet mean/std"
#: ConvNeXt's processor, which the ConvNeXt-V2 (224 px) and ResNet checkpoints use too.
_CONVNEXT_PROCESSOR = f"ConvNextImageProcessor: shorter side to 224/0.875 = 256 (bicubic), centre crop 224, {_IMAGENET}"

#: Every supported family by ``model_type``.
ARCHITECTURES: dict[str, Architecture] = {
    record.model_type: record
    for record in (
        Architecture(
            "convnext", "ConvNeXt", ConvNextForImageClassification, ConvNextModel, pooled, _last_hidden_size, "classifier",
            "facebook/convnext-base-224",
            _CONVNEXT_PROCESSOR,
        ),
        Architecture(
            "convnextv2", "ConvNeXt-V2", ConvNextV2ForImageClassification, ConvNextV2Model, pooled, _last_hidden_size,
            "classifier", "facebook/convnextv2-base-22k-224",
            _CONVNEXT_PROCESSOR,
        ),
        Architecture(
            "resnet", "ResNet", ResNetForImageClassification, ResNetModel, pooled_flat, _last_hidden_size, "classifier.1",
            "microsoft/resnet-50",
            _CONVNEXT_PROCESSOR,
        ),
        Architecture(
            "vit", "ViT", ViTForImageClassification, ViTModel, cls_token, _hidden_size, "classifier",
            "google/vit-base-patch16-224",
            "ViTImageProcessor: resized to 224 x 224 (bilinear, no crop), mean/std 0.5",
            backbone_options={"add_pooling_layer": False},
        ),
        Architecture(
            "dinov2", "DINOv2", Dinov2ForImageClassification, Dinov2Model, cls_and_mean_patch, _twice_hidden_size,
            "classifier", "facebook/dinov2-base",
            f"BitImageProcessor: shorter side to 256 (bicubic), centre crop 224, {_IMAGENET}",
        ),
        Architecture(
            "swin", "Swin", SwinForImageClassification, SwinModel, pooled, _swin_features, "classifier",
            "microsoft/swin-tiny-patch4-window7-224",
            f"ViTImageProcessor: resized to 224 x 224 (bicubic, no crop), {_IMAGENET}",
        ),
    )
}  # fmt: skip


def supported_families() -> str:
    """``ConvNeXt (convnext), ConvNeXt-V2 (convnextv2), ...``: what an error about a family names."""
    return ", ".join(f"{record.name} ({record.model_type})" for record in ARCHITECTURES.values())


def architecture(model_type: str | None) -> Architecture:
    """The record of ``model_type``; one ``CheckpointError`` naming the supported families otherwise."""
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"model type '{model_type}' is not a supported family: {supported_families()}")
    return ARCHITECTURES[model_type]


def architecture_of(config: PretrainedConfig) -> Architecture:
    """The record of a loaded config (or a model's ``config``)."""
    return architecture(getattr(config, "model_type", None))


def backbone_features(backbone: nn.Module, pixel_values: Tensor) -> Tensor:
    """The head's input for ``pixel_values`` through ``backbone`` (a family's base model)."""
    return architecture_of(backbone.config).features(backbone(pixel_values=pixel_values))
