"""AdaMerging end to end, in-process (and on 2 CPU processes), offline.

The pool is tiny (``merge_fixtures``): a ``_pretrained_`` ConvNeXt and two seeded "fine-tuned"
ones (eurosat, 10 classes; dtd, 47). The adaptation data are small ``save_to_disk`` test sets;
with ``adaptation_batch_size`` equal to their size every step sees the whole set, so the
summed entropy that training minimises can be recomputed here independently: the merged
backbone from the explicit formula ``theta_0 + sum_t lambda_t,k tau_t,k`` in float64, run
through a plain ``ConvNextForImageClassification`` with each task's head.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
from ddp_scripts.adamerging_steps import StopAfter, read_steps
from torch.func import functional_call
from transformers import ConvNextModel

import merge_fixtures as mf
from datamodules.preprocessing import ImagePreprocessor
from datamodules.tasks import get_task
from datamodules.torch_data import ImageClassificationDataset
from lightning_modules.adamerging import AdaMerging, prediction_entropy
from merge import main
from merging.coefficients import Coefficients, LearnedCoefficients, coefficients_heatmap, write_coefficients
from merging.engine import merge_backbone
from merging.errors import CheckpointError, MergeError
from merging.methods import TaskArithmetic
from merging.pool import ModelPool
from tolerances import FLOAT64_RTOL, U32, U64, assert_within, gamma, linear_merge_bound

pytestmark = pytest.mark.usefixtures("quiet_cli", "one_thread")

TASKS = ("eurosat", "dtd")
SIZE = 16  # images per task; also the adaptation batch, so each step sees the whole set
MERGE_PY = str(mf.REPO_ROOT / "merge.py")
RECORDER = "ddp_scripts.adamerging_steps.StepRecorder"
# The authors' protocol (EnnengYang/AdaMerging): clamp in the forward pass, a fresh shuffle every step.
AUTHORS = ("--model.clamp_mode", "forward", "--data.adaptation_draw", "fresh")
PROTOCOLS = {"default": (), "authors": AUTHORS}
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Setup:
    pool: dict[str, str]
    data: dict[str, str]
    keys: list[str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("adamerging")
    pool = mf.make_pool(root / "models", TASKS, seed=3)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, SIZE, pool[task], seed=30 + i)) for i, task in enumerate(TASKS)
    }
    keys = [key for key in mf.load_state(pool[mf.PRETRAINED]) if key.startswith("convnext.")]
    return Setup(pool, data, keys)


def fit_args(setup: Setup, out: Path, *extra: str, granularity: str = "layer", lr: float = 0.05, steps: int = 10,
             batch: int = SIZE, callbacks: list | None = None) -> list[str]:  # fmt: skip
    callbacks = [{"class_path": RECORDER, "init_args": {"directory": str(out / "steps")}}, *(callbacks or [])]
    return [
        "fit",
        "--seed_everything", "0",
        "--trainer.logger", "false",
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(out / "root"),
        "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", json.dumps(callbacks),
        *mf.QUIET,
        "--model", "lightning_modules.adamerging.AdaMerging",
        "--model.models", json.dumps(setup.pool),
        "--model.granularity", granularity,
        "--model.lr", str(lr),
        "--model.output_dir", str(out / "coefficients"),
        "--model.report_dir", str(out / "report"),
        "--data.tasks", json.dumps(list(TASKS)),
        "--data.paths", json.dumps(setup.data),
        "--data.processor", setup.pool[mf.PRETRAINED],
        "--data.adaptation_batch_size", str(batch),
        "--data.num_workers", "0",
        *extra,
    ]  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def table_of(content: dict) -> dict[str, dict[str, float]]:
    """``{task: {key: lambda}}`` of a coefficients file, task-wise files expanded to every key."""
    table = content["coefficients"]
    if content["granularity"] == "task":
        return {task: dict.fromkeys(content["keys"], float(value)) for task, value in table.items()}
    return table


def reference_backbone(setup: Setup, table: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    """``theta_0 + sum_t lambda_t,k tau_t,k`` per key, in float64, from the task vectors in float32
    (as the project computes them: the same inputs on both sides)."""
    pretrained = mf.backbone(mf.load_state(setup.pool[mf.PRETRAINED]))
    finetuned = {task: mf.load_state(setup.pool[task]) for task in TASKS}
    merged = {}
    for key, theta0 in pretrained.items():
        total = theta0.double()
        for task in TASKS:
            total = total + table[task][key] * (finetuned[task][key] - theta0).double()
        merged[key] = total
    return merged


def reference_entropy(setup: Setup, table: dict[str, dict[str, float]]) -> float:
    """Sum over tasks of the mean prediction entropy on the task's images (labels unused), all in
    float64: the quantity a fit in float64 (``FLOAT64``) computes, to ``FLOAT64_RTOL``."""
    merged = reference_backbone(setup, table)
    total = 0.0
    for task in TASKS:
        images, labels = mf.read_test_set(setup.data[task])
        log_p = torch.log_softmax(mf.score(setup.pool[task], images, labels, backbone_state=merged).logits, dim=1)
        total += float(-(log_p.exp() * log_p).sum(dim=1).mean())
    return total


#: The initial coefficient as the project holds it: 0.3 in float32 (then float64 in a float64 fit).
INITIAL = float(torch.tensor(0.3))


def linear_bounds(setup: Setup, table: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    """Per key, the bound between two float32 evaluations of ``theta_0 + sum_t lambda_t tau_t``
    (``tolerances.linear_merge_bound`` with the coefficients folded into the task vectors)."""
    pretrained = mf.backbone(mf.load_state(setup.pool[mf.PRETRAINED]))
    finetuned = {task: mf.load_state(setup.pool[task]) for task in TASKS}
    return {
        key: linear_merge_bound(theta0, [table[task][key] * (finetuned[task][key] - theta0) for task in TASKS], 1.0)
        for key, theta0 in pretrained.items()
    }


def constant_table(setup: Setup, value: float) -> dict[str, dict[str, float]]:
    return {task: dict.fromkeys(setup.keys, value) for task in TASKS}


def recorded_table(setup: Setup, coefficients: list[list[float]]) -> dict[str, dict[str, float]]:
    return {
        task: dict(zip(setup.keys, row * len(setup.keys) if len(row) == 1 else row)) for task, row in zip(TASKS, coefficients)
    }


def images(setup: Setup, task: str) -> list[torch.Tensor]:
    """The task's test images as the adaptation sees them (the project's preprocessing)."""
    preprocess = ImagePreprocessor.from_pretrained(setup.pool[mf.PRETRAINED])
    return [preprocess(image) for image in mf.read_test_set(setup.data[task])[0]]


def classnames() -> dict[str, list[str]]:
    return {task: list(get_task(task).classnames) for task in TASKS}


# --- prediction_entropy --------------------------------------------------------------------------


def entropy_bound(logits: torch.Tensor) -> float:
    """Float32 error of the mean entropy: ``log_softmax`` (a shift, a sum of ``C`` exponentials, a
    log, a subtraction) errs by ``gamma_{C+3}`` of ``range(z) + log C`` per entry, and ``exp``,
    the products and the sum of ``C`` terms weighted by ``p`` (summing to 1) add ``gamma_{C+3}``."""
    classes = logits.shape[1]
    spread = float((logits.amax(dim=1) - logits.amin(dim=1)).max()) + math.log(classes)
    return 2 * gamma(classes + 3) * spread


def test_prediction_entropy_by_hand():
    uniform = torch.full((3, 7), 2.5)
    assert abs(float(prediction_entropy(uniform)) - math.log(7)) <= entropy_bound(uniform)
    confident = torch.zeros(2, 10)
    confident[:, 4] = 60.0
    assert 0.0 <= float(prediction_entropy(confident)) < 1e-20
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)) * 3
    rows = []
    for row in logits.tolist():
        weights = [math.exp(value) for value in row]
        p = [w / sum(weights) for w in weights]
        rows.append(-sum(q * math.log(q) for q in p))
    assert abs(float(prediction_entropy(logits)) - sum(rows) / len(rows)) <= entropy_bound(logits)
    # half precision in, float32 arithmetic (an exact conversion first): the same computation
    assert float(prediction_entropy(logits.half())) == float(prediction_entropy(logits.half().float()))
    # float64 in, float64 arithmetic
    assert abs(float(prediction_entropy(logits.double())) - sum(rows) / len(rows)) <= entropy_bound(logits) * U64 / U32


# --- fit: learning, files, labels, clamping -------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_fit_lowers_the_summed_entropy_and_writes_the_coefficients(setup, tmp_path, granularity):
    main(fit_args(setup, tmp_path, *FLOAT64, granularity=granularity))
    out = tmp_path / "coefficients"
    assert sorted(p.name for p in out.iterdir()) == ["coefficients.json", "coefficients.png"]
    assert (out / "coefficients.png").read_bytes()[:8] == PNG
    content = read_json(out / "coefficients.json")
    assert content["granularity"] == granularity
    assert content["tasks"] == list(TASKS)
    assert content["keys"] == setup.keys
    assert list(content["coefficients"]) == list(TASKS)
    width = len(setup.keys) if granularity == "layer" else 1
    for task in TASKS:
        values = content["coefficients"][task]
        if granularity == "layer":
            assert list(values) == setup.keys
        else:
            assert isinstance(values, float)

    (records,) = read_steps(tmp_path / "steps").values()
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all(len(r["coefficients"]) == len(TASKS) and all(len(row) == width for row in r["coefficients"]) for r in records)
    final = records[-1]["coefficients"]
    assert table_of(content) == recorded_table(setup, final)
    assert max(abs(value - INITIAL) for row in final for value in row) > 0.02  # the coefficients moved

    # The loss of step 1 is the summed entropy at the initial coefficients (0.3 everywhere),
    # and of step s+1 the entropy at step s's coefficients: the objective is what it claims
    # (both computations in float64: FLOAT64_RTOL).
    initial = reference_entropy(setup, constant_table(setup, INITIAL))
    assert records[0]["loss"] == pytest.approx(initial, rel=FLOAT64_RTOL)
    assert records[5]["loss"] == pytest.approx(
        reference_entropy(setup, recorded_table(setup, records[4]["coefficients"])), rel=FLOAT64_RTOL
    )
    learned = reference_entropy(setup, table_of(content))
    assert learned < initial - 1e-3, (initial, learned)


def test_fit_never_reads_a_label(setup, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a labelled dataset was read during fit")

    monkeypatch.setattr(ImageClassificationDataset, "__getitem__", refuse)
    monkeypatch.setattr(ImageClassificationDataset, "__getitems__", refuse)
    original = datasets.Dataset.__getitem__
    reads = []

    def guarded(self, key):
        result = original(self, key)
        if key == "label" or (isinstance(result, dict) and "label" in result):
            raise AssertionError(f"label column read during fit ({key!r})")
        reads.append(key)
        return result

    monkeypatch.setattr(datasets.Dataset, "__getitem__", guarded)
    main(fit_args(setup, tmp_path, steps=3, batch=8))
    assert reads  # the guard saw the image reads
    assert (tmp_path / "coefficients" / "coefficients.json").is_file()
    (records,) = read_steps(tmp_path / "steps").values()
    image = {"tensor": "torch.float32", "shape": [8, 3, 32, 32]}
    # Each step: one dict of images per task, nothing else (no labels, no tuples).
    assert [r["batch"] for r in records] == [{"dict": dict.fromkeys(TASKS, image)}] * 3


def test_coefficients_stay_within_the_clamp_range_after_every_step(setup, tmp_path):
    main(fit_args(setup, tmp_path, lr=5.0, steps=4))
    (records,) = read_steps(tmp_path / "steps").values()
    values = [v for r in records for row in r["coefficients"] for v in row]
    assert len(records) == 4
    assert all(0.0 <= v <= 1.0 for v in values), (min(values), max(values))
    # The step size (5) really pushes past the range: the bounds are reached, both of them.
    assert 0.0 in values and 1.0 in values
    saved = [v for row in table_of(read_json(tmp_path / "coefficients" / "coefficients.json")).values() for v in row.values()]
    assert all(0.0 <= v <= 1.0 for v in saved)


def test_forward_clamp_merges_with_clamped_coefficients_and_leaves_the_stored_ones_free(setup, tmp_path):
    main(fit_args(setup, tmp_path, "--model.clamp_mode", "forward", *FLOAT64, lr=5.0, steps=4))
    (records,) = read_steps(tmp_path / "steps").values()
    stored = [torch.tensor(r["coefficients"], dtype=torch.float64) for r in records]
    assert any(((values < 0) | (values > 1)).any() for values in stored)  # the step size pushes them out
    # The loss of step s+1 is the entropy of the merge with step s's coefficients clamped to
    # [0, 1] (the merge with the stored values would be far from it).
    for before, after in zip(stored, records[1:]):
        clamped = recorded_table(setup, before.clamp(0, 1).tolist())
        assert after["loss"] == pytest.approx(reference_entropy(setup, clamped), rel=FLOAT64_RTOL)
        assert after["loss"] != pytest.approx(reference_entropy(setup, recorded_table(setup, before.tolist())), rel=1e-3)
    # The file holds what the merge used: the clamped values.
    written = table_of(read_json(tmp_path / "coefficients" / "coefficients.json"))
    assert written == recorded_table(setup, stored[-1].clamp(0, 1).tolist())


def test_fresh_draws_reach_the_adaptation_steps(setup, tmp_path):
    """Eight of the sixteen images per step: the stream covers all sixteen in every two steps,
    a fresh shuffle per step draws some images again."""
    totals = {task: sum(float(image.double().sum()) for image in images(setup, task)) for task in TASKS}
    for draw in ("stream", "fresh"):
        main(fit_args(setup, tmp_path / draw, "--data.adaptation_draw", draw, steps=6, batch=8))
        (records,) = read_steps(tmp_path / draw / "steps").values()
        pairs = [(records[k], records[k + 1]) for k in range(0, 6, 2)]
        covering = [all(first["image_sums"][t] + second["image_sums"][t] == pytest.approx(totals[t], rel=1e-9) for t in TASKS)
                    for first, second in pairs]  # fmt: skip
        assert all(covering) if draw == "stream" else not any(covering), draw


def test_a_fresh_draw_larger_than_a_test_set_is_refused(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(setup, tmp_path, "--data.adaptation_draw", "fresh", batch=2 * SIZE))
    assert f"adaptation_batch_size {2 * SIZE} exceeds the {SIZE} test images" in capsys.readouterr().err


# --- DDP and resume ---------------------------------------------------------------------------------


#: One process against two, in float64 (``--trainer.precision 64-true``): the two runs are different
#: computations (a batch of 8 per step against two of 4, their gradients summed by DDP), whose
#: rounding differs with the CPU's kernels, and Adam's steps carry it from step to step. In float32
#: this test's coefficients differ by 4.2e-7 (AMD, AVX-512) to 1.6e-6 (Intel, AMX) after 5 steps. In
#: float64 every first-order rounding error of the same computation is U32 / U64 = 2**29 times smaller
#: (6.7e-16 measured): a difference of COEFFICIENT_ATOL = 1e-9 would take an amplification K of
#: 1e-9 / U64 = 9e6 roundings, for which the float32 runs would differ by K * U32 = 0.54, the whole
#: range of a coefficient. A real fault (a gradient not synchronised, a rank on other images) moves
#: the coefficients by lr = 0.05 in one step. The logged entropies scale alike: rel 1e-9.
FLOAT64 = mf.FLOAT64
COEFFICIENT_ATOL = 1e-9
ENTROPY_RTOL = 1e-9


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_two_processes_follow_the_one_process_trajectory(setup, tmp_path, protocol):
    steps, batch = 6, 8  # 4 images per rank and step
    main(fit_args(setup, tmp_path / "single", *FLOAT64, *PROTOCOLS[protocol], steps=steps, batch=batch))
    command = fit_args(setup, tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp", *FLOAT64,
                       *PROTOCOLS[protocol], steps=steps, batch=batch)  # fmt: skip
    pythonpath = f"{mf.REPO_ROOT}:{mf.REPO_ROOT / 'tests'}"
    result = subprocess.run(
        [sys.executable, MERGE_PY, *command],
        cwd=tmp_path,
        env=mf.subprocess_env(PYTHONPATH=pythonpath),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    per_rank = read_steps(tmp_path / "ddp" / "steps")
    (single,) = read_steps(tmp_path / "single" / "steps").values()
    assert sorted(per_rank) == [0, 1]
    assert all(r["world_size"] == 2 for records in per_rank.values() for r in records)
    for step, (zero, one, reference) in enumerate(zip(per_rank[0], per_rank[1], single), start=1):
        assert zero["step"] == one["step"] == reference["step"] == step
        assert zero["coefficients"] == one["coefficients"], f"ranks differ after step {step}"
        assert zero["batch"]["dict"][TASKS[0]]["tensor"] == reference["batch"]["dict"][TASKS[0]]["tensor"] == "torch.float64"
        got = torch.tensor(zero["coefficients"], dtype=torch.float64)
        expected = torch.tensor(reference["coefficients"], dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=0, atol=COEFFICIENT_ATOL), f"step {step}: {(got - expected).abs().max()}"
        # What is logged is the entropy of the whole step's images, as one process logs it,
        # on every rank (a per-rank value would be the entropy of half the images).
        assert sorted(reference["logged"]) == ["train/entropy", *(f"train/entropy/{task}" for task in sorted(TASKS))]
        for name, value in reference["logged"].items():
            assert zero["logged"][name] == pytest.approx(value, rel=ENTROPY_RTOL), f"step {step}: {name}"
            assert one["logged"][name] == pytest.approx(value, rel=ENTROPY_RTOL), f"step {step}: {name}"
        # The one process logs the loss it returns: the same float64 number.
        assert reference["logged"]["train/entropy"] == reference["loss"]
        # The ranks split the one-process batch between them: the same images per step. Sums of
        # the same n = 8 x 3 x 32 x 32 float32 pixels in float64 (exact products, so only the
        # additions round), in two parts or one: at most 2 gamma_n(U64) sum |x| apart, with
        # |x| <= 2.7 (the processor's normalisation of [0, 255]).
        for task in TASKS:
            assert zero["batch"]["dict"][task]["shape"][0] == batch // 2
            both = zero["image_sums"][task] + one["image_sums"][task]
            pixels = batch * 3 * 32 * 32
            assert abs(both - reference["image_sums"][task]) <= 2 * gamma(pixels, U64) * pixels * 2.7
    assert torch.tensor(single[-1]["coefficients"]).sub(0.3).abs().max() > 0.02
    files = tmp_path / "ddp" / "coefficients"
    stored = torch.tensor(per_rank[0][-1]["coefficients"], dtype=torch.float64)
    applied = stored.clamp(0, 1).tolist()  # the stored values, clamped in the forward pass
    assert table_of(read_json(files / "coefficients.json")) == recorded_table(setup, applied)


def test_task_by_task_backward_follows_the_one_graph_trajectory(setup, tmp_path):
    """Each task's backward on its own (the memory of one task's activations) against the one graph
    over every task that AdaMerging used before: the same Adam steps on the same summed entropy,
    recomputed here with one backward per step. Both in float64 (FLOAT64), so the only difference
    is the order of the gradient's sums, within COEFFICIENT_ATOL after six steps (see above)."""
    steps, lr = 6, 0.05
    main(fit_args(setup, tmp_path, *FLOAT64, steps=steps, lr=lr))  # batch = SIZE: every step sees every image
    (records,) = read_steps(tmp_path / "steps").values()
    model = AdaMerging(list(TASKS), classnames(), setup.pool, lr=lr)
    model.build()
    model = model.double()
    pixels = {task: torch.stack(images(setup, task)).double() for task in TASKS}
    optimizer = torch.optim.Adam([model.coefficients], lr=lr)
    for record in records:
        optimizer.zero_grad()
        merged = model.merged_parameters()
        loss = sum(
            prediction_entropy(model.heads(functional_call(model.backbone, merged, (pixels[task],)).pooler_output, task))
            for task in TASKS
        )
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.coefficients.clamp_(0.0, 1.0)
        got = torch.tensor(record["coefficients"], dtype=torch.float64)
        assert torch.allclose(got, model.coefficients.detach(), rtol=0, atol=COEFFICIENT_ATOL), record["step"]
        assert record["loss"] == pytest.approx(float(loss), rel=ENTROPY_RTOL), record["step"]
    assert len(records) == steps and (got - INITIAL).abs().max() > 0.02  # the coefficients moved


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_resumed_fit_ends_where_an_uninterrupted_one_does(setup, tmp_path, protocol):
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    every = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(checkpoints), "every_n_train_steps": 4, "save_last": True, "save_top_k": -1}}  # fmt: skip
    lr = 0.2  # large enough that some coefficients sit on (or, clamped in the forward pass, past) a bound by the checkpoint
    extra = (*PROTOCOLS[protocol], "--data.adaptation_batch_size", "8")  # with fresh draws, steps see different images
    main(fit_args(setup, tmp_path / "straight", *extra, lr=lr))
    with pytest.raises(StopAfter):
        main(fit_args(setup, tmp_path / "interrupted", "--trainer.enable_checkpointing", "true", *extra, lr=lr,
                      callbacks=[every, {"class_path": "ddp_scripts.adamerging_steps.FailAtStep", "init_args": {"step": 6}}]))  # fmt: skip
    assert not (tmp_path / "interrupted" / "coefficients").exists()
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    (straight,) = read_steps(tmp_path / "straight" / "steps").values()
    at_checkpoint = torch.tensor(straight[3]["coefficients"])
    if protocol == "default":
        assert ((at_checkpoint == 0) | (at_checkpoint == 1)).any()  # clamping was active by then
    else:
        assert ((at_checkpoint < 0) | (at_checkpoint > 1)).any()  # the stored values are not clamped
    assert torch.equal(saved["state_dict"]["coefficients"], at_checkpoint)

    main(fit_args(setup, tmp_path / "interrupted", "--trainer.enable_checkpointing", "true", "--ckpt_path", "last",
                  *extra, lr=lr, callbacks=[every]))  # fmt: skip
    (records,) = read_steps(tmp_path / "interrupted" / "steps").values()
    resumed = records[6:]  # the first run wrote steps 1-6, the resumed one 5-10
    assert [r["step"] for r in records[:6]] == list(range(1, 7))
    assert [r["step"] for r in resumed] == list(range(5, 11))
    for got, expected in zip(resumed, straight[4:]):
        assert got["image_sums"] == expected["image_sums"], f"step {got['step']}: other images"
        assert got["coefficients"] == expected["coefficients"], f"step {got['step']}"
    final = read_json(tmp_path / "interrupted" / "coefficients" / "coefficients.json")
    assert final == read_json(tmp_path / "straight" / "coefficients" / "coefficients.json")


# --- The learned merge equals task arithmetic at equal lambdas; merge.py test -------------------


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_equal_coefficients_are_task_arithmetic(setup, tmp_path, granularity):
    c = 0.37
    width = len(setup.keys) if granularity == "layer" else 1
    path = tmp_path / "coefficients.json"
    write_coefficients(path, torch.full((len(TASKS), width), c), TASKS, setup.keys, granularity)
    pool = ModelPool(setup.pool)
    expected = merge_backbone(pool, TaskArithmetic(c), progress=False)
    learned = merge_backbone(pool, LearnedCoefficients(str(path)), progress=False)
    assert sorted(learned) == sorted(expected) == sorted(setup.keys)
    # theta_0 + c sum_t tau_t and theta_0 + sum_t c tau_t: two float32 evaluations of one formula.
    bounds = linear_bounds(setup, constant_table(setup, c))
    for key, tensor in expected.items():
        assert_within(learned[key], tensor, bounds[key], key)

    model = AdaMerging(list(TASKS), classnames(), setup.pool, granularity=granularity, init_value=c)
    model.build()
    assert tuple(model.coefficients.shape) == (len(TASKS), width)
    with torch.no_grad():
        merged = model.merged_parameters()
    assert sorted("convnext." + name for name in merged) == sorted(setup.keys)
    for key, tensor in expected.items():
        assert_within(merged[key.removeprefix("convnext.")], tensor, bounds[key], key)

    # Started from the file instead of init_value: the same coefficients.
    from_file = AdaMerging(list(TASKS), classnames(), setup.pool, granularity=granularity, init_value=0.9, coefficients=str(path))
    assert torch.equal(from_file.coefficients.detach(), torch.full((len(TASKS), width), c))


def random_coefficients(setup: Setup, path: Path, seed: int = 7) -> dict[str, dict[str, float]]:
    values = torch.rand(len(TASKS), len(setup.keys), generator=torch.Generator().manual_seed(seed))
    write_coefficients(path, values, TASKS, setup.keys, "layer")
    return table_of(read_json(path))


def test_unequal_coefficients_follow_the_formula(setup, tmp_path):
    table = random_coefficients(setup, tmp_path / "coefficients.json")
    expected = reference_backbone(setup, table)
    learned = merge_backbone(ModelPool(setup.pool), LearnedCoefficients(str(tmp_path / "coefficients.json")), progress=False)
    # The numbers themselves, without a file: the same merge.
    given = merge_backbone(ModelPool(setup.pool), LearnedCoefficients(Coefficients("layer", table)), progress=False)
    with pytest.raises(MergeError, match="coefficients: granularity must be task or layer, got 'tensor'"):
        Coefficients("tensor", table)
    model = AdaMerging(list(TASKS), classnames(), setup.pool, coefficients=str(tmp_path / "coefficients.json"))
    model.build()
    with torch.no_grad():
        merged = model.merged_parameters()
    bounds = linear_bounds(setup, table)
    for key, tensor in expected.items():
        assert_within(learned[key], tensor, bounds[key], key)
        assert torch.equal(given[key], learned[key]), key
        assert_within(merged[key.removeprefix("convnext.")], tensor, bounds[key], key)


def test_merge_py_test_with_learned_coefficients(setup, tmp_path):
    """The same coefficients through AdaMerging's test and MergedClassifier's LearnedCoefficients,
    both in float64 (``FLOAT64``): each merges ``theta_0 + sum_t lambda_t tau_t`` its own way (in
    float64 after the module's conversion, in float32 before it), each within the arithmetic's
    bound of the formula, and each report scores its own weights (a float64 evaluation)."""
    path = tmp_path / "coefficients.json"
    table = random_coefficients(setup, path, seed=11)
    common = [
        "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1", *mf.QUIET, *FLOAT64,
        "--data.tasks", json.dumps(list(TASKS)), "--data.paths", json.dumps(setup.data),
        "--data.processor", setup.pool[mf.PRETRAINED], "--data.batch_size", "8", "--data.num_workers", "0",
    ]  # fmt: skip
    pool = ["--model.models", json.dumps(setup.pool)]
    main(["test", *common, "--model", "lightning_modules.adamerging.AdaMerging", *pool, "--model.coefficients", str(path),
          "--model.report_dir", str(tmp_path / "ada"), "--model.output_dir", str(tmp_path / "unused")])  # fmt: skip
    main(["test", *common, "--model", "lightning_modules.merged.MergedClassifier", *pool,
          "--model.method", "merging.coefficients.LearnedCoefficients", "--model.method.coefficients", str(path),
          "--model.report_dir", str(tmp_path / "merged")])  # fmt: skip
    ada, merged = read_json(tmp_path / "ada" / "report.json"), read_json(tmp_path / "merged" / "report.json")
    assert sorted(p.name for p in (tmp_path / "ada").iterdir()) == mf.REPORT_FILES
    assert not (tmp_path / "unused").exists()  # test writes no coefficients
    assert ada["coefficients"] == str(path)  # the report names the file that was evaluated
    (ada_row,) = ada["rows"].values()
    (merged_row,) = merged["rows"].values()
    # The weights each evaluated: the same code here, on the same machine (the same bits).
    model = AdaMerging(list(TASKS), classnames(), setup.pool, coefficients=str(path))
    model.build()
    with torch.no_grad():
        ada_weights = {"convnext." + name: tensor for name, tensor in model.double().merged_parameters().items()}
    engine_weights = merge_backbone(ModelPool(setup.pool), LearnedCoefficients(str(path)), progress=False)
    reference, bounds = reference_backbone(setup, table), linear_bounds(setup, table)
    for key, tensor in reference.items():
        assert_within(ada_weights[key], tensor, bounds[key], key)
        assert_within(engine_weights[key], tensor, bounds[key], key)
    for task in TASKS:
        images, labels = mf.read_test_set(setup.data[task])
        mf.assert_scores(ada_row["tasks"][task], mf.score(setup.pool[task], images, labels, ada_weights), 8, task)
        mf.assert_scores(merged_row["tasks"][task], mf.score(setup.pool[task], images, labels, engine_weights), 8, task)
        assert ada_row["tasks"][task]["num_samples"] == merged_row["tasks"][task]["num_samples"] == SIZE


def test_a_non_finite_task_vector_is_refused_naming_file_and_key(setup, tmp_path):
    key = "convnext.encoder.stages.1.layers.0.pwconv1.weight"
    copy = mf.copy_checkpoint(setup.pool["dtd"], tmp_path / "nan")

    def poison(state):
        tensor = state[key].clone()
        tensor[3, 1] = float("nan")
        return {**state, key: tensor}

    mf.rewrite_tensors(copy, poison)
    model = AdaMerging(list(TASKS), classnames(), {**setup.pool, "dtd": str(copy)})
    with pytest.raises(CheckpointError, match="non-finite") as error:
        model.build()
    assert key in str(error.value) and str(copy / "model.safetensors") in str(error.value)


# --- The heat map's columns: parameter tensors in network order -----------------------------------


def test_network_keys_follow_the_network_not_the_alphabet(tmp_path):
    """Twelve blocks in stage 2: the checkpoint file sorts ``layers.10`` before ``layers.2``."""
    pretrained = mf.make_pretrained(tmp_path / "deep", depths=[1, 1, 12, 1])
    pool = ModelPool({mf.PRETRAINED: str(pretrained), "dtd": str(pretrained)})
    with torch.device("meta"):
        model = ConvNextModel(mf.tiny_config(depths=[1, 1, 12, 1]))
    network = ["convnext." + key for key in model.state_dict()]
    assert pool.backbone_keys == sorted(network)  # the safetensors header: alphabetical
    assert pool.network_keys == network
    position = {key: index for index, key in enumerate(pool.network_keys)}
    stage = "convnext.encoder.stages.2"
    assert position[f"{stage}.layers.2.dwconv.weight"] < position[f"{stage}.layers.10.dwconv.weight"]
    assert position["convnext.embeddings.patch_embeddings.weight"] == 0
    assert max(position, key=position.get).startswith("convnext.layernorm.")


def test_the_heat_map_draws_the_columns_in_network_order(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    keys = [f"convnext.encoder.stages.0.layers.{i}.dwconv.weight" for i in (0, 1, 10, 11, 2, 3)]  # as sorted
    network = sorted(keys, key=lambda key: int(key.split(".")[5]))
    # Each coefficient is its key's position in the network: drawn in order, the row reads 0, 1, 2, ...
    values = torch.tensor([[float(network.index(key)) for key in keys], [10.0 + network.index(key) for key in keys]])
    drawn = []
    original = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, data, **kwargs: drawn.append(data) or original(self, data, **kwargs))
    coefficients_heatmap(tmp_path / "map.png", values, TASKS, keys, network)
    (image,) = drawn
    assert image.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]]
    assert (tmp_path / "map.png").read_bytes()[:8] == PNG


def test_resuming_with_another_draw_is_refused(setup, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    every = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(checkpoints), "every_n_train_steps": 2, "save_last": True}}  # fmt: skip
    main(fit_args(setup, tmp_path, "--trainer.enable_checkpointing", "true", steps=2, batch=8, callbacks=[every]))
    with pytest.raises(SystemExit):
        main(fit_args(setup, tmp_path, "--trainer.enable_checkpointing", "true", "--ckpt_path", "last",
                      "--data.adaptation_draw", "fresh", steps=4, batch=8, callbacks=[every]))  # fmt: skip
    assert "training data order differs from this run (fresh_draws 0 -> 1)" in capsys.readouterr().err
