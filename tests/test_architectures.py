"""The architecture record (``common.architectures``), family by family, on tiny configs of each
(``tests/families.py``): the record's features and head give the Hugging Face classifier's logits
bit for bit, its keys are the ones ``save_pretrained`` writes, and the merge engine and each
method treat every family as their docstrings say (what is a matrix, what is a Linear, what a
BatchNorm counter becomes, the one line where a method has nothing to treat specially).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import families
import merge_fixtures as mf
from common.architectures import ARCHITECTURES, architecture, backbone_features, supported_families
from common.errors import CheckpointError
from lightning_modules.adamerging import AdaMerging, EvalBatchNorm2d
from lightning_modules.backbones import backbone_from_state
from lightning_modules.evaluation import ModulatedBackbones
from lightning_modules.python_api import merged_classifier, task_classnames
from merging.cart import CART
from merging.emr import EMRMerging
from merging.engine import merge_backbone, merge_per_task
from merging.errors import MergeError
from merging.grams import linear_layers
from merging.methods import SimpleAverage, TaskArithmetic, TiesMerging
from merging.pool import PRETRAINED, ModelPool
from merging.regmean import RegMean
from merging.spectral import IsotropicCommon, IsotropicCommonTask, TaskSingularVectors, tsv_merge
from merging.wudi import WUDIMerging
from tolerances import FLOAT64_RTOL, assert_within

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("eurosat", "dtd")
#: The prefixes and head keys the record must give (the literals FusionBench's pools use).
EXPECTED = {
    "convnext": ("convnext.", ("classifier.weight", "classifier.bias")),
    "convnextv2": ("convnextv2.", ("classifier.weight", "classifier.bias")),
    "resnet": ("resnet.", ("classifier.1.weight", "classifier.1.bias")),
    "vit": ("vit.", ("classifier.weight", "classifier.bias")),
    "dinov2": ("dinov2.", ("classifier.weight", "classifier.bias")),
    "swin": ("swin.", ("classifier.weight", "classifier.bias")),
}


def test_every_family_has_a_record_and_a_tiny_config() -> None:
    assert set(ARCHITECTURES) == set(families.CONFIGS) == set(EXPECTED)
    assert list(ARCHITECTURES)[0] == "convnext"  # the default, named first in every message


@pytest.fixture(scope="module", params=list(families.CONFIGS))
def saved(request, tmp_path_factory) -> tuple[str, torch.nn.Module, str]:
    """A tiny classifier of each family (eval mode) and its ``save_pretrained`` directory."""
    model_type = request.param
    directory = families.make_pretrained(model_type, tmp_path_factory.mktemp(model_type) / "model")
    record = ARCHITECTURES[model_type]
    return model_type, record.classifier_class.from_pretrained(directory).eval(), str(directory)


def test_features_and_head_give_the_classifiers_logits_bit_for_bit(saved) -> None:
    model_type, model, _ = saved
    record = architecture(model_type)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        features = backbone_features(record.backbone_of(model), pixels)
        assert features.shape == (3, record.feature_size(model.config))
        # The project's evaluation: the features through the head's Linear (a SwitchModule route).
        assert torch.equal(record.head_linear(model)(features), expected)


def test_the_keys_are_the_ones_save_pretrained_writes(saved) -> None:
    model_type, model, directory = saved
    record = architecture(model_type)
    prefix, head_keys = EXPECTED[model_type]
    assert record.prefix == prefix and record.head_keys == head_keys
    with safe_open(f"{directory}/model.safetensors", "pt") as file:
        stored = set(file.keys())
        state = {key: file.get_tensor(key) for key in stored}
    keys = record.checkpoint_keys(model.config)
    assert stored == set(keys) | set(head_keys)
    assert all(key.startswith(prefix) for key in keys)
    # The backbone rebuilt from the file's tensors is the classifier's own, and gives them back.
    backbone = record.backbone_from_state(model.config, {key: state[key] for key in keys})
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(backbone_features(backbone, pixels), backbone_features(record.backbone_of(model), pixels))
    rebuilt = record.backbone_state(backbone)
    assert list(rebuilt) == list(keys) and all(torch.equal(rebuilt[key], state[key]) for key in keys)


def test_a_fresh_head_has_the_familys_layout(saved) -> None:
    model_type, model, _ = saved
    record = architecture(model_type)
    head = record.new_head(model.config, 7)
    linear = head[1] if model_type == "resnet" else head
    assert isinstance(linear, nn.Linear) and linear.out_features == 7
    # DINOv2's classifier reads the CLS token and the mean patch token side by side.
    assert linear.in_features == (2 * model.config.hidden_size if model_type == "dinov2" else record.feature_size(model.config))
    if model_type == "resnet":
        assert isinstance(head[0], nn.Flatten)
    assert set(head.state_dict()) == {key.removeprefix("classifier.") for key in record.head_keys}


def test_an_unsupported_model_type_names_the_supported_families() -> None:
    with pytest.raises(CheckpointError) as error:
        architecture("regnet")
    assert str(error.value) == (
        "model type 'regnet' is not a supported family: ConvNeXt (convnext), ConvNeXt-V2 (convnextv2), "
        "ResNet (resnet), ViT (vit), DINOv2 (dinov2), Swin (swin)"
    )
    assert supported_families() in str(error.value)


# --- Merging each family ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(families.CONFIGS))
def pool(request, tmp_path_factory) -> tuple[str, dict[str, str]]:
    model_type = request.param
    return model_type, families.make_pool(model_type, tmp_path_factory.mktemp(f"pool-{model_type}"), TASKS)


@pytest.fixture(scope="module")
def resnet_pool(tmp_path_factory) -> dict[str, str]:
    """The family without a 2-D weight or a Linear, and with BatchNorm."""
    return families.make_pool("resnet", tmp_path_factory.mktemp("pool-resnet-only"), TASKS)


def backbone_state(directory: str, record) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in mf.load_state(directory).items() if key.startswith(record.prefix)}


@pytest.mark.parametrize(
    "method, params",
    [("simple_average", {}), ("task_arithmetic", {"scaling_factor": 0.4}), ("ties", {"top_k": 0.3, "scaling_factor": 0.7})],
)
def test_the_engine_merges_every_family_by_the_formulas(pool, method, params) -> None:
    model_type, models = pool
    record = architecture(model_type)
    merge = {"simple_average": SimpleAverage, "task_arithmetic": TaskArithmetic, "ties": TiesMerging}[method](**params)
    merged = merge_backbone(ModelPool(models), merge, progress=False)
    pretrained = backbone_state(models[mf.PRETRAINED], record)
    finetuned = [backbone_state(models[task], record) for task in TASKS]
    assert list(merged) == [key for key in mf.load_state(models[mf.PRETRAINED]) if key.startswith(record.prefix)]
    weights = [key for key, tensor in pretrained.items() if tensor.is_floating_point()]
    # Every floating-point tensor (BatchNorm's running statistics too) by the method's formula...
    mf.assert_merge_matches(
        {key: merged[key] for key in weights},
        method,
        params,
        {key: pretrained[key] for key in weights},
        [{key: model[key] for key in weights} for model in finetuned],
    )
    # ... and BatchNorm's counters, which differ in every fine-tune, the pretrained model's.
    counters = [key for key in pretrained if key not in weights]
    assert bool(counters) == (model_type == "resnet")
    assert all(torch.equal(merged[key], pretrained[key]) for key in counters)
    assert all(not torch.equal(finetuned[0][key], pretrained[key]) for key in counters)


def test_a_per_task_merge_gives_every_family_one_backbone_per_task(pool) -> None:
    # EMR on each family: each task's backbone (BatchNorm's counters the pretrained model's), and the
    # evaluation's one module taking each task's weights in turn (Swin's unsaved buffers left as built).
    model_type, models = pool
    record = architecture(model_type)
    merged = merge_per_task(ModelPool(models), EMRMerging(), progress=False)
    pretrained = backbone_state(models[mf.PRETRAINED], record)
    row = ModulatedBackbones(ModelPool(models).config(PRETRAINED), merged)
    for task in (*TASKS, TASKS[0]):
        state = merged.backbone(task)
        assert list(state) == list(pretrained)
        assert all(torch.equal(state[key], tensor) for key, tensor in pretrained.items() if not tensor.is_floating_point())
        module_state = record.backbone_state(row.backbone_for(task))
        assert all(torch.equal(module_state[key], tensor) for key, tensor in state.items()), task
    assert not all(torch.equal(merged.backbone(TASKS[0])[key], merged.backbone(TASKS[1])[key]) for key in pretrained)


#: Per family, what the spectral methods take as matrices (by the key's last parts).
MATRICES = {
    "convnext": {"pwconv1.weight", "pwconv2.weight"},
    "convnextv2": {"pwconv1.weight", "pwconv2.weight"},
    "resnet": set(),
    "vit": {"query.weight", "key.weight", "value.weight", "output.dense.weight", "intermediate.dense.weight"},
    "dinov2": {"query.weight", "key.weight", "value.weight", "output.dense.weight", "fc1.weight", "fc2.weight", "mask_token"},
    "swin": {
        "query.weight", "key.weight", "value.weight", "output.dense.weight", "intermediate.dense.weight",
        "relative_position_bias_table", "reduction.weight",
    },
}  # fmt: skip


def ends(key: str) -> str:
    """``...attention.output.dense.weight`` -> ``output.dense.weight``; ``...pwconv1.weight`` -> ``pwconv1.weight``."""
    parts = key.split(".")
    return (
        ".".join(parts[-3:]) if parts[-2] == "dense" else ".".join(parts[-2:]) if parts[-1] in ("weight", "bias") else parts[-1]
    )


def test_the_spectral_methods_take_the_2d_tensors_of_each_family_as_matrices(pool) -> None:
    model_type, models = pool
    reader = ModelPool(models)
    shapes = {key: reader.reader(mf.PRETRAINED).shape(key) for key in reader.merge_keys}
    special = TaskSingularVectors().special_keys(shapes, None)
    found = {ends(key) for key in special}
    # ViT's and Swin's last MLP layer is `output.dense` too: the attention's and the MLP's both.
    assert found == MATRICES[model_type] | ({"output.dense.weight"} if model_type in ("vit", "swin") else set())
    # The position embeddings and the CLS token are 3-D in transformers' ViT and DINOv2: averaged.
    assert not any(ends(key) in ("position_embeddings", "cls_token") for key in special)


@pytest.mark.parametrize(
    "method",
    [TaskSingularVectors(scaling_factor=1.0), IsotropicCommon(scaling_factor=1.0), IsotropicCommonTask(0.8, 1.0)],
    ids=lambda method: method.name,
)
def test_a_spectral_method_on_a_resnet_says_it_is_task_arithmetic_and_is(method, resnet_pool, capsys) -> None:
    model_type, models = "resnet", resnet_pool
    merged = merge_backbone(ModelPool(models), method, progress=True)
    printed = [line for line in capsys.readouterr().out.splitlines() if "on this ResNet backbone" in line]
    assert printed == [
        f"{method.describe()} on this ResNet backbone: none of its tensors is a 2-D weight matrix (its convolutions are "
        "4-D kernels), so every tensor gets the mean task vector: this merge is task arithmetic with scaling_factor 1/2 "
        "= 0.5; --model.method.conv_as_matrix true reads each convolution kernel as an (out, in x k x k) matrix instead"
    ]
    record = architecture(model_type)
    pretrained = backbone_state(models[mf.PRETRAINED], record)
    finetuned = [backbone_state(models[task], record) for task in TASKS]
    weights = [key for key, tensor in pretrained.items() if tensor.is_floating_point()]
    vectors = mf.task_vectors({key: pretrained[key] for key in weights}, [{key: m[key] for key in weights} for m in finetuned])
    for key in weights:  # theta_0 + alpha * mean tau: summed in float64, rounded once
        expected = (pretrained[key].double() + 0.5 * sum(tau[key].double() for tau in vectors)).float()
        assert_within(merged[key], expected, 2 * torch.finfo(torch.float32).eps * expected.abs() + 1e-30, key)


@pytest.mark.parametrize("method", [WUDIMerging(iter_num=3), CART(rank_ratio=0.5, scaling_factor=1.0)], ids=lambda m: m.name)
def test_wudi_and_cart_take_the_2d_tensors_as_the_spectral_methods_do(method, pool) -> None:
    reader = ModelPool(pool[1])
    shapes = {key: reader.reader(mf.PRETRAINED).shape(key) for key in reader.merge_keys}
    assert method.special_keys(shapes, None) == TaskSingularVectors().special_keys(shapes, None)


@pytest.mark.parametrize("method", [WUDIMerging(iter_num=3), CART(rank_ratio=0.5, scaling_factor=1.0)], ids=lambda m: m.name)
def test_wudi_and_cart_on_a_resnet_say_they_are_the_simple_average_and_are(method, resnet_pool, capsys) -> None:
    merged = merge_backbone(ModelPool(resnet_pool), method, progress=True)
    printed = [line for line in capsys.readouterr().out.splitlines() if "on this ResNet backbone" in line]
    assert len(printed) == 1 and printed[0].startswith(f"{method.describe()} on this ResNet backbone: none of its tensors")
    assert printed[0].endswith("the simple average")
    record = architecture("resnet")
    pretrained = backbone_state(resnet_pool[mf.PRETRAINED], record)
    finetuned = [backbone_state(resnet_pool[task], record) for task in TASKS]
    for key, tensor in pretrained.items():
        if tensor.is_floating_point():  # theta_0 + mean tau: each tau rounded to float32, the sum in float64
            taus = [m[key].double() - tensor.double() for m in finetuned]
            expected = (tensor.double() + sum(taus) / len(TASKS)).float()
            spread = sum(tau.abs() for tau in taus).float() / len(TASKS)
            assert_within(merged[key], expected, torch.finfo(torch.float32).eps * (expected.abs() + spread) + 1e-30, key)


def test_conv_as_matrix_merges_each_kernel_as_its_im2col_matrix(resnet_pool, capsys) -> None:
    model_type, models = "resnet", resnet_pool
    method = TaskSingularVectors(scaling_factor=1.0, conv_as_matrix=True)
    assert method.describe() == "tsv_m(scaling_factor=1, conv_as_matrix=True)"
    merged = merge_backbone(ModelPool(models), method, progress=True)
    assert "on this ResNet backbone" not in capsys.readouterr().out  # it has matrices now
    record = architecture(model_type)
    pretrained = backbone_state(models[mf.PRETRAINED], record)
    finetuned = [backbone_state(models[task], record) for task in TASKS]
    kernels = [key for key, tensor in pretrained.items() if tensor.ndim == 4]
    assert kernels
    for key in kernels:
        rows = pretrained[key].shape[0]
        taus = [(model[key] - pretrained[key]).reshape(rows, -1) for model in finetuned]
        expected = tsv_merge(pretrained[key].reshape(rows, -1), taus, 1.0, 2).reshape(pretrained[key].shape)
        assert torch.equal(merged[key], expected), key
        plain = pretrained[key] + 0.5 * sum(model[key] - pretrained[key] for model in finetuned)
        assert not torch.allclose(merged[key], plain, atol=1e-6), key


@pytest.mark.parametrize("model_type", list(families.CONFIGS))
def test_regmean_covers_every_linear_of_the_backbone(model_type) -> None:
    record = architecture(model_type)
    config = families.family_config(model_type)
    backbone = record.build_backbone(config)
    layers = linear_layers(backbone)
    keys = record.checkpoint_keys(config)
    assert set(layers) <= set(keys)  # under the checkpoint's own names
    linears = {name for name, module in backbone.named_modules() if isinstance(module, nn.Linear)}
    assert {keys[key].removesuffix(".weight") for key in layers} == linears
    if model_type in ("vit", "dinov2"):  # query, key, value, output and the MLP's two, in every layer
        per_layer = {ends(key) for key in layers}
        assert per_layer >= {"query.weight", "key.weight", "value.weight", "output.dense.weight"}
        assert len(layers) == 6 * config.num_hidden_layers
    assert (len(layers) == 0) == (model_type == "resnet")


def test_regmean_on_a_resnet_says_it_is_the_simple_average_and_is(resnet_pool, capsys) -> None:
    models = resnet_pool
    merged = merge_backbone(ModelPool(models), RegMean(0.9), progress=True, grams={})
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "on this ResNet backbone" in line]
    assert line == (
        "regmean(reduce_non_diagonal_ratio=0.9) on this ResNet backbone: none of its layers is an nn.Linear (its layers "
        "are convolutions), so no Gram matrix is used and every tensor is the simple average: this merge is the simple average"
    )
    average = merge_backbone(ModelPool(models), SimpleAverage(), progress=False)
    assert all(torch.equal(merged[key], average[key]) for key in average)


def test_a_pool_mixing_families_is_one_error_naming_both(tmp_path) -> None:
    resnet = families.make_pool("resnet", tmp_path / "resnet", TASKS[:1])
    vit = families.make_pool("vit", tmp_path / "vit", TASKS[1:])
    mixed = {mf.PRETRAINED: resnet[mf.PRETRAINED], TASKS[0]: resnet[TASKS[0]], TASKS[1]: vit[TASKS[1]]}
    with pytest.raises(MergeError) as error:
        merge_backbone(ModelPool(mixed), SimpleAverage(), progress=False)
    assert str(error.value).startswith(
        f"the model pool mixes families: _pretrained_ ('{resnet[mf.PRETRAINED]}') is a ResNet, dtd ('{vit['dtd']}') a ViT"
    )


def test_load_model_builds_each_familys_classifier_with_the_tasks_head(pool) -> None:
    model_type, models = pool
    record = architecture(model_type)
    entry = {"config_path": models[mf.PRETRAINED], "dataset_name": "cifar10"}
    model = ModelPool({mf.PRETRAINED: entry}, classnames=task_classnames).load_model(mf.PRETRAINED)
    assert type(model) is record.classifier_class and not model.training
    assert record.head_linear(model).out_features == 10 and model.config.id2label[3] == "cat"
    # A task's classifier with a merged backbone in place of its own: the merged tensors, its head.
    merged = merge_backbone(ModelPool(models), SimpleAverage(), progress=False)
    classifier = merged_classifier(ModelPool(models, classnames=task_classnames), "dtd", merged)
    state = classifier.state_dict()
    rebuilt = record.backbone_state(record.backbone_of(classifier))
    assert all(torch.equal(rebuilt[key], merged[key]) for key in merged)
    head = mf.load_state(models["dtd"])
    assert torch.equal(state[record.head_keys[0]], head[record.head_keys[0]])


def test_adamerging_keeps_the_backbone_in_eval_mode(resnet_pool) -> None:
    """BatchNorm normalises with the running statistics the merge gives it, as in evaluation,
    while the coefficients train: the entropy minimised is the scored model's."""
    models = resnet_pool
    module = AdaMerging(list(TASKS), {task: list(task_classnames(task)) for task in TASKS}, models)
    module.build()
    module.train()
    assert module.training and not module.backbone.training
    assert not any(layer.training for layer in module.backbone.modules() if isinstance(layer, nn.BatchNorm2d))
    # Every floating-point tensor has its coefficient (the running statistics too), no counter does.
    assert module.keys == ModelPool(models).merge_keys
    assert any(key.endswith("running_var") for key in module.keys)
    assert not any(key.endswith("num_batches_tracked") for key in module.keys)


def test_adamerging_differentiates_batchnorm_through_its_running_statistics(resnet_pool) -> None:
    """Torch's fused batch_norm has no gradient for the running statistics; the backbone AdaMerging
    trains through (``EvalBatchNorm2d``) computes the same eval-mode map, in float64 within the
    arithmetic's rounding (``FLOAT64_RTOL``, two evaluations of one formula, in another order),
    and gives every merged statistic's coefficient a gradient."""
    module = AdaMerging(list(TASKS), {task: list(task_classnames(task)) for task in TASKS}, resnet_pool)
    module.build()
    layers = [layer for layer in module.backbone.modules() if isinstance(layer, nn.BatchNorm2d)]
    assert layers and all(type(layer) is EvalBatchNorm2d for layer in layers)
    pool = ModelPool(resnet_pool)
    state = {
        key: tensor for key, tensor in mf.load_state(resnet_pool[PRETRAINED]).items() if not pool.architecture.is_head_key(key)
    }
    plain = backbone_from_state(pool.config(PRETRAINED), state)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = backbone_features(plain.double().eval(), images)
        got = backbone_features(module.backbone.double(), images)
    assert torch.allclose(got, expected, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * float(expected.abs().max()))
    module.double()
    loss = module.training_step({task: images for task in TASKS}, 0)
    loss.backward()
    gradient = module.coefficients.grad
    statistics = [index for index, key in enumerate(module.keys) if key.endswith(("running_mean", "running_var"))]
    assert statistics and bool((gradient[:, statistics] != 0).all())
