"""PCB-Merging (``merging/pcb.py``): the exact order statistics against ``torch.kthvalue`` of the
concatenated vectors, the paper's formula on hand-built tensors, the streamed statistics and
merge against the formula computed here on the flattened backbone (the paper's equations and
the authors' ``PCB_merge``), ``merge.py test --model.method PCBMerging``, a ResNet (BatchNorm's
running statistics in the one vector, its counters the pretrained model's) and bad input.

The references below flatten the whole backbone into one vector per task, as the authors do,
and follow the formulas step by step with torch's ``softmax``, ``sort`` and ``kthvalue`` in
float64, never with the module's helpers. The PCB matrix is float32 in both (the module rounds it
once): a float64 ``beta`` computed in another order differs by ``~1e-16`` relatively and rounds
to the same float32 but for entries within that distance of a rounding boundary, which neither
moves a threshold nor the results beyond ``float64_results_bound``.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import families
import merge_fixtures as mf
import test_bad_input
from common.errors import CheckpointError
from merge import main
from merging import METHODS, PCBMerging
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.pcb import OrderStatistics, ordered_keys
from merging.pool import ModelPool
from merging.saved import load_merged
from tolerances import assert_within, float64_results_bound

pytestmark = pytest.mark.usefixtures("one_thread")
workdir = test_bad_input.workdir

TASKS = ("eurosat", "dtd", "mnist")


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- References on the flattened backbone ----------------------------------------------------


def norm(x: torch.Tensor) -> torch.Tensor:
    """Min-max over every entry; 0 for a constant vector (any constant: the softmax is uniform)."""
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


def paper_reference(theta0: torch.Tensor, taus: torch.Tensor, ratio: float, scaling_factor: float):
    """Equations (2)-(6) on ``[T, D]`` task vectors: the merged vector (float32), the PCB matrix
    ``D^2 beta`` (float32, as the module keeps it) and each task's threshold."""
    x = taus.double()
    count, size = x.shape
    beta = torch.stack(
        [
            torch.softmax(count * norm(x[i] * x[i]), 0) * sum(torch.softmax(norm(x[i] * x[j]), 0) for j in range(count))
            for i in range(count)
        ]
    )
    beta = (beta * size * size).float()
    rank = min(int(size * (1 - ratio)), size - 1)
    thresholds = beta.kthvalue(rank + 1, dim=1).values
    kept = torch.where(beta >= thresholds[:, None], beta, 0).double()
    total = kept.sum(0)
    merged = torch.where(total > 0, (kept * x).sum(0) / torch.where(total > 0, total, 1), 0)
    return (theta0.double() + scaling_factor * merged).float(), beta, thresholds


def authors_reference(theta0: torch.Tensor, taus: torch.Tensor, ratio: float, scaling_factor: float) -> torch.Tensor:
    """The authors' ``PCB_merge`` step by step (in float64, its scores rounded to float32 as the
    module keeps them), then ``theta_0 + lambda * merged``."""
    x = taus.double()
    count, size = x.shape
    ordered = x.abs().sort(dim=1).values
    low, high = ordered[:, int(size * 0.0001)], ordered[:, int(size * (1 - 0.0001) - 1)]
    clipped = x.abs().clamp(low[:, None], high[:, None])
    intra = torch.exp(count * ((clipped - low[:, None]) / (high - low)[:, None]) ** 2)
    beta = (intra * torch.tanh(x * x.sum(0))).float().double()
    thresholds = beta.sort(dim=1).values[:, int(size * (1 - ratio))]
    floored = beta.clamp(min=thresholds[:, None])
    scale = (floored - thresholds[:, None]) / (beta.max(1).values - thresholds)[:, None]
    merged = (torch.sign(x) * clipped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    return (theta0.double() + scaling_factor * merged).float()


def run_pcb(method: PCBMerging, pretrained: list[torch.Tensor], taus: list[list[torch.Tensor]]):
    """The engine's contract without files: ``pool_statistics`` over a sweep of the parts (one
    list of ``T`` task vectors per key), then ``merge`` part by part. Returns the merged parts and
    the statistics."""
    keys = [f"part{index}" for index in range(len(pretrained))]

    def sweep(description: str):
        for key, vectors in zip(keys, taus):
            yield key, list(vectors)

    method.prepare([f"task{i}" for i in range(len(taus[0]))], keys)
    statistics = method.pool_statistics(sweep)
    return [method.merge(theta0, iter(vectors), statistics) for theta0, vectors in zip(pretrained, taus)], statistics


def close(result: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert result.dtype == torch.float32 and result.shape == expected.shape
    assert_within(result, expected, float64_results_bound(expected))


# --- Order statistics ------------------------------------------------------------------------


def test_order_statistics_are_kthvalue_of_the_concatenated_vectors():
    generator = torch.Generator().manual_seed(0)
    ulps = 1.0 + torch.arange(40, dtype=torch.float32) * 2.0**-23  # 40 neighbours, one coarse bucket
    special = t([-0.0, 0.0, -math.inf, math.inf, 1e-45, -1e-45, 3.4e38, -3.4e38, 0.0, 0.0])
    vectors = [
        torch.cat([torch.randn(3000, generator=generator), special, ulps, ulps]),  # signs, infinities, ties
        torch.cat([torch.full((3000,), 0.25), ulps.repeat(2), special]),  # mostly one value
        torch.cat([torch.rand(3000, generator=generator) * 1e-30, special, ulps, ulps]),  # tiny and subnormal
    ]
    size = vectors[0].numel()
    assert all(vector.numel() == size for vector in vectors)
    cuts = [0, 1, 700, 701, 2500, size]  # parts of 1 entry and more
    stacked = torch.stack(vectors)
    ranks = [0, 1, 2999, 3000, 3005, 3030, size // 2, size - 2, size - 1]
    for magnitudes in (False, True):
        select = OrderStatistics(len(vectors))
        select.CHUNK = 1000  # parts read in chunks, across the cuts
        for begin, end in zip(cuts, cuts[1:]):
            select.add(stacked[:, begin:end], magnitudes=magnitudes)
        select.choose(ranks)
        for begin, end in zip(cuts, cuts[1:]):
            select.refine(stacked[:, begin:end], magnitudes=magnitudes)
        for vector, values in zip(vectors, select.values()):
            vector = vector.abs() if magnitudes else vector
            assert values == [float(vector.kthvalue(rank + 1).values) for rank in ranks]  # -0.0 == 0.0
    with pytest.raises(ValueError, match="ranks"):
        select.choose([size])


def test_ordered_keys_sort_as_the_floats():
    values = t([3.0, -0.0, 0.0, -2.5, math.inf, -math.inf, 1e-45, -1e-45, 2.0, -3.0])
    keys = ordered_keys(values)
    assert keys.dtype == torch.int32
    assert torch.equal(values[keys.argsort(stable=True)], values.sort(stable=True).values)


# --- The paper's formula on hand-built tensors -------------------------------------------------

# tau_1 = (2, 1), tau_2 = (1, 2), N = D = 2. Norm(tau_1^2) = Norm(4, 1) = (1, 0), Norm(tau_2^2) = (0, 1);
# tau_1 tau_2 = (2, 2) is constant: its softmax is (1/2, 1/2). So intra_1 = (e^2, 1) / (e^2 + 1),
# inter_1 = (e, 1) / (e + 1) + (1/2, 1/2), and task 2 mirrors task 1. At entry 0 the weights are
# beta_1 : beta_2 = w : 1 with w = e^2 (e / (e + 1) + 1/2) / (1 / (e + 1) + 1/2) = e^2 (3e + 1) / (e + 3),
# and entry 1 mirrors it: both merge to (2 w + 1) / (w + 1).
E = math.e
W = E**2 * (3 * E + 1) / (E + 3)
HAND_TAUS = [t([2.0, 1.0]), t([1.0, 2.0])]
HAND_THETA0 = t([0.5, -1.0])


def test_paper_formula_by_hand_keeping_every_entry():
    merged, _ = run_pcb(PCBMerging(pcb_ratio=1.0, scaling_factor=0.5), [HAND_THETA0], [HAND_TAUS])
    mean = (2 * W + 1) / (W + 1)
    close(merged[0], [0.5 + 0.5 * mean, -1.0 + 0.5 * mean])


def test_paper_formula_by_hand_each_task_keeps_its_larger_weight():
    # r = 0.5: the threshold is sorted(beta_i)[int(2 * 0.5)], the larger weight; task 1 keeps entry 0,
    # task 2 entry 1, and each entry is its one task's: beta tau / beta (exact in binary).
    merged, statistics = run_pcb(PCBMerging(pcb_ratio=0.5, scaling_factor=0.5), [HAND_THETA0], [HAND_TAUS])
    assert torch.equal(merged[0], t([1.5, 0.0]))
    assert statistics.thresholds[0] == statistics.thresholds[1]  # the mirror image


def test_the_softmaxes_and_norms_are_over_the_whole_backbone_not_each_tensor():
    # The same two entries as two one-entry tensors: the same merge. Per tensor, every vector
    # would be constant, every softmax uniform, w = 1 and both entries (2 + 1) / 2.
    parts = [[tau[:1] for tau in HAND_TAUS], [tau[1:] for tau in HAND_TAUS]]
    merged, _ = run_pcb(PCBMerging(pcb_ratio=1.0, scaling_factor=0.5), [HAND_THETA0[:1], HAND_THETA0[1:]], parts)
    whole, _ = run_pcb(PCBMerging(pcb_ratio=1.0, scaling_factor=0.5), [HAND_THETA0], [HAND_TAUS])
    assert torch.equal(torch.cat(merged), whole[0])
    assert abs(float(whole[0][0]) - (0.5 + 0.5 * 1.5)) > 0.1


def test_ties_at_the_threshold_are_kept_and_an_entry_no_task_keeps_is_not_updated():
    # tau_1 = (1, 1, 0): Norm(tau_1^2) = (1, 1, 0), and tau_1 tau_2 = 0 is constant, so beta_1 = (b, b, c),
    # b > c; tau_2 = (0, 0, 3) mirrors it: beta_2 = (c', c', b'). r = 1/3: the threshold sorted(beta_i)[2]
    # is b (b'): task 1 keeps its two tied entries, task 2 its third, each entry one task's own.
    taus = [t([1.0, 1.0, 0.0]), t([0.0, 0.0, 3.0])]
    merged, _ = run_pcb(PCBMerging(pcb_ratio=1 / 3, scaling_factor=1.0), [t([0.0, 0.0, 0.0])], [taus])
    assert torch.equal(merged[0], t([1.0, 1.0, 3.0]))
    # r = 0.01 keeps a 0.03 share, but the rank is still int(3 * 0.99) = 2: both tied entries stay.
    merged, _ = run_pcb(PCBMerging(pcb_ratio=0.01, scaling_factor=1.0), [t([0.0, 0.0, 0.0])], [taus])
    assert torch.equal(merged[0], t([1.0, 1.0, 3.0]))
    # r = 1/4 of 4 entries: each task keeps its largest; entries 1 and 2, kept by neither, stay theta_0.
    taus = [t([4.0, 3.0, 0.0, 0.0]), t([0.0, 0.0, 3.0, 4.0])]
    merged, _ = run_pcb(PCBMerging(pcb_ratio=0.25, scaling_factor=1.0), [t([1.0, 1.0, 1.0, 1.0])], [taus])
    assert torch.equal(merged[0], t([5.0, 1.0, 1.0, 5.0]))


# --- The engine against the flattened formulas --------------------------------------------------


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("pcb_pool"), TASKS)


@pytest.fixture(scope="module")
def flat(pool_dirs):
    """The pool's backbone keys, pretrained backbone, task vectors (per task, per key), and the
    pretrained backbone and task vectors as one vector each."""
    pretrained = mf.backbone(mf.load_state(pool_dirs[mf.PRETRAINED]))
    keys = list(pretrained)
    taus = [
        {key: tensor - pretrained[key] for key, tensor in mf.backbone(mf.load_state(pool_dirs[task])).items()} for task in TASKS
    ]
    theta0 = torch.cat([pretrained[key].reshape(-1) for key in keys])
    stacked = torch.stack([torch.cat([tau[key].reshape(-1) for key in keys]) for tau in taus])
    return keys, pretrained, taus, theta0, stacked


def unflatten(vector: torch.Tensor, pretrained: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    parts, start = {}, 0
    for key in keys:
        parts[key] = vector[start : start + pretrained[key].numel()].view(pretrained[key].shape)
        start += pretrained[key].numel()
    return parts


@pytest.mark.parametrize(("ratio", "scaling_factor"), [(0.1, 1.2), (0.5, 0.8)])
def test_engine_equals_the_papers_formula_on_the_flattened_backbone(pool_dirs, flat, ratio, scaling_factor):
    keys, pretrained, taus, theta0, stacked = flat
    expected, beta, thresholds = paper_reference(theta0, stacked, ratio, scaling_factor)
    method = PCBMerging(pcb_ratio=ratio, scaling_factor=scaling_factor)
    merged = merge_backbone(ModelPool(pool_dirs), method, progress=False)
    assert list(merged) == keys
    for key, tensor in unflatten(expected, pretrained, keys).items():
        assert merged[key].dtype == torch.float32 and merged[key].shape == tensor.shape
        assert_within(merged[key], tensor, float64_results_bound(tensor), key)
    assert not torch.equal(merged[keys[0]], pretrained[keys[0]])
    # The thresholds, order statistics of beta over the whole backbone, are kthvalue's of the concatenation.
    _, statistics = run_pcb(method, [pretrained[key] for key in keys], [[tau[key] for tau in taus] for key in keys])
    assert torch.equal(statistics.thresholds, thresholds)
    size = stacked.shape[1]
    assert torch.all((beta >= thresholds[:, None]).sum(1) >= size - min(int(size * (1 - ratio)), size - 1))


@pytest.mark.parametrize(("ratio", "scaling_factor"), [(0.05, 1.2), (1.0, 0.7)])
def test_engine_equals_the_authors_formula_on_the_flattened_backbone(pool_dirs, flat, ratio, scaling_factor):
    keys, pretrained, _, theta0, stacked = flat
    expected = authors_reference(theta0, stacked, ratio, scaling_factor)
    method = PCBMerging(pcb_ratio=ratio, scaling_factor=scaling_factor, formula="authors")
    merged = merge_backbone(ModelPool(pool_dirs), method, progress=False)
    for key, tensor in unflatten(expected, pretrained, keys).items():
        assert_within(merged[key], tensor, float64_results_bound(tensor), key)
    paper = unflatten(paper_reference(theta0, stacked, ratio, scaling_factor)[0], pretrained, keys)
    assert max(float((paper[key] - merged[key]).abs().max()) for key in keys) > 1e-3  # two different formulas


def test_pcb_is_registered_described_and_elementwise_given_its_statistics():
    method = METHODS["pcb"](pcb_ratio=0.1, scaling_factor=1.2)
    assert type(method) is PCBMerging and method.needs_pool_statistics and method.elementwise
    assert method.describe() == "pcb(pcb_ratio=0.1, scaling_factor=1.2, formula=paper)"
    assert "arXiv 2410.02396" in PCBMerging.__doc__


# --- A ResNet: BatchNorm's running statistics in the vector, counters the pretrained model's ------


def test_a_resnet_merges_every_floating_point_tensor_as_one_vector(tmp_path):
    pool = families.make_pool("resnet", tmp_path, TASKS[:2])
    pretrained = {key: value for key, value in mf.load_state(pool[mf.PRETRAINED]).items() if key.startswith("resnet.")}
    weights = [key for key, value in pretrained.items() if value.is_floating_point()]
    counters = [key for key in pretrained if key not in weights]
    assert counters and any("running_var" in key for key in weights)
    finetuned = [load_file(f"{pool[task]}/model.safetensors") for task in TASKS[:2]]
    theta0 = torch.cat([pretrained[key].reshape(-1) for key in weights])
    taus = torch.stack([torch.cat([(model[key] - pretrained[key]).reshape(-1) for key in weights]) for model in finetuned])
    expected = unflatten(paper_reference(theta0, taus, 0.2, 1.0)[0], pretrained, weights)
    merged = merge_backbone(ModelPool(pool), PCBMerging(pcb_ratio=0.2, scaling_factor=1.0), progress=False)
    for key in weights:
        assert_within(merged[key], expected[key], float64_results_bound(expected[key]), key)
    assert all(torch.equal(merged[key], pretrained[key]) for key in counters)


def test_a_non_finite_input_is_found_by_the_first_pass(pool_dirs, tmp_path):
    bad = shutil.copytree(pool_dirs["dtd"], tmp_path / "dtd")
    state = load_file(f"{bad}/model.safetensors")
    key = [key for key in state if key.startswith("convnext.")][-1]  # read last: the first pass still checks it
    state[key] = state[key].clone()
    state[key].view(-1)[0] = math.nan
    save_file(state, f"{bad}/model.safetensors")
    with pytest.raises(CheckpointError, match=f"non-finite values \\(NaN/Inf\\) in '{key}' of '.*dtd/model.safetensors'"):
        merge_backbone(ModelPool({**pool_dirs, "dtd": str(bad)}), PCBMerging(pcb_ratio=0.1, scaling_factor=1.0), progress=False)


# --- merge.py -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcb_cli")
    pool = mf.make_pool(root / "models", TASKS[:2], seed=4)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, 4, pool[task], seed=20 + i)) for i, task in enumerate(TASKS[:2])
    }
    return pool, data


def test_merge_py_merges_and_saves_with_pcb(cli_setup, tmp_path, quiet_cli):
    pool, data = cli_setup
    saved = tmp_path / "saved"
    args = mf.merge_test_args(tmp_path, data, pool[mf.PRETRAINED], 4)
    args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps(pool)]
    args += ["--model.method", "PCBMerging", "--model.method.pcb_ratio", "0.2", "--model.method.scaling_factor", "1.5"]
    main([*args, "--model.method.formula", "authors", "--model.save_dir", str(saved), "--trainer.limit_test_batches", "0"])
    model = load_merged(saved)
    expected = merge_backbone(ModelPool(pool), PCBMerging(pcb_ratio=0.2, scaling_factor=1.5, formula="authors"), progress=False)
    assert sorted(model.backbone) == sorted(expected)
    assert all(torch.equal(model.backbone[key], tensor) for key, tensor in expected.items())
    assert model.info["method"] == "pcb(pcb_ratio=0.2, scaling_factor=1.5, formula=authors)"


BAD_INPUT = {
    "a ratio of 0": (["--model.method.pcb_ratio", "0", "--model.method.scaling_factor", "1"], "pcb_ratio must be in (0, 1], got 0.0"),
    "a ratio above 1": (["--model.method.pcb_ratio", "1.5", "--model.method.scaling_factor", "1"], "pcb_ratio must be in (0, 1], got 1.5"),
    "no lambda": (["--model.method.pcb_ratio", "0.1"], "model.method: the following arguments are required: scaling_factor"),
    "an unknown formula": (["--model.method.pcb_ratio", "0.1", "--model.method.scaling_factor", "1", "--model.method.formula", "code"],
                           "formula must be one of paper, authors, got 'code'"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_error_line_and_nothing_written(cli_setup, workdir, capsys, case):
    options, message = BAD_INPUT[case]
    pool, data = cli_setup
    args = mf.merge_test_args(workdir, data, pool[mf.PRETRAINED], 4)
    args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps(pool)]
    args += ["--model.method", "PCBMerging", *options, "--model.report_dir", str(workdir / "report")]
    test_bad_input.assert_contains(test_bad_input.one_error_line(main, args, capsys), message)
    assert not list(workdir.iterdir())


def test_options_and_the_number_of_models_are_checked_up_front():
    for bad in (0.0, -0.1, 1.0000001, math.nan, math.inf):
        with pytest.raises(MergeError, match=r"pcb_ratio must be in \(0, 1\]"):
            PCBMerging(pcb_ratio=bad, scaling_factor=1.0)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(MergeError, match="scaling_factor must be a finite number"):
            PCBMerging(pcb_ratio=0.1, scaling_factor=bad)
    PCBMerging(pcb_ratio=0.1, scaling_factor=1.0).prepare([f"task{i}" for i in range(80)], ["k"])
    with pytest.raises(MergeError, match="at most 80 fine-tuned models .*, got 81"):
        PCBMerging(pcb_ratio=0.1, scaling_factor=1.0).prepare([f"task{i}" for i in range(81)], ["k"])
