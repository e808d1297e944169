"""The model pool: the pretrained checkpoint and one fine-tuned checkpoint per task.

Besides the merge's streaming reads, a pool loads its entries as Hugging Face classifiers
(``load_model``, with FusionBench's ``pretrained`` and ``dataset_name``), their image processor
(``load_processor``) and saves a classifier (``save_model``), as FusionBench's
``ConvNextForImageClassificationPool`` (and its ResNet and DINOv2 pools) do. Every entry is of one
family (``common.architectures``: ConvNeXt, ResNet, ViT, ...), the pretrained model's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoImageProcessor, PretrainedConfig, PreTrainedModel

from common.architectures import Architecture
from common.checkpoints import (
    check_checkpoint,
    check_head_config,
    check_head_labels,
    check_model_source,
    network_order,
    resolve_model_dir,
)
from common.errors import CheckpointError
from common.files import write_atomically
from common.names import task_key
from common.reader import CheckpointReader
from merging.errors import MergeError

PRETRAINED = "_pretrained_"

#: Where a pool finds a task's class names, in label order, to size and label a head for an
#: entry's ``dataset_name``: a mapping task -> names, or a function of the task's name (the task
#: registry's, from ``lightning_modules.python_api.model_pool``). ``merging`` does not know the tasks.
ClassNames = Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]]


@dataclass(frozen=True)
class _Loading:
    """How ``load_model`` builds an entry: FusionBench's ``pretrained`` (its weights, or its config
    with random weights) and ``dataset_name`` (the task whose head it gets; None: its own head)."""

    pretrained: bool = True
    dataset_name: str | None = None


def _loading_of(name: str, entry: str | Mapping[str, Any]) -> _Loading:
    if isinstance(entry, str):
        return _Loading()
    pretrained, dataset_name = entry.get("pretrained", True), entry.get("dataset_name")
    if not isinstance(pretrained, bool):
        raise MergeError(f"pool entry '{name}': pretrained must be true or false, got {pretrained!r}")
    if dataset_name is not None and not (isinstance(dataset_name, str) and dataset_name.strip()):
        raise MergeError(f"pool entry '{name}': dataset_name must be a task's name or null, got {dataset_name!r}")
    return _Loading(pretrained, dataset_name)


def _source_of(name: str, entry: str | Mapping[str, Any]) -> str:
    if isinstance(entry, str):
        return entry
    for key in ("config_path", "path", "model_name_or_path"):
        if entry.get(key):
            return str(entry[key])
    raise MergeError(f"pool entry '{name}' names no checkpoint (give config_path: <hub id or directory>)")


def read_pool_file(path: str) -> dict[str, Any]:
    """The ``models`` mapping of a FusionBench-style model pool YAML, or of a ``merge.py``
    config (``model.init_args.models``)."""
    file = Path(path)
    if not file.is_file():
        raise MergeError(f"model pool file '{path}' does not exist")
    content = yaml.safe_load(file.read_text()) or {}
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        content = content["model"].get("init_args", content["model"])
    models = content.get("models", content) if isinstance(content, dict) else None
    if isinstance(models, str):  # a merge config naming its pool file, relative to the config's folder
        nested = file.parent / models
        if nested.resolve() == file.resolve():
            raise MergeError(f"model pool file '{path}' names itself as its pool")
        return read_pool_file(str(nested))
    if not isinstance(models, dict):
        raise MergeError(f"model pool file '{path}' has no 'models' mapping")
    return models


#: What every pair of entries that hold one checkpoint is told.
_DISTINCT = "each task needs its own fine-tuned model, and _pretrained_ the model they were all fine-tuned from"
#: Bytes read from each end of a weight file to tell checkpoints apart (``ModelPool.check_distinct``).
_FINGERPRINT_BYTES = 1 << 20


def _check_entry_source(name: str, source: str, pool_file: str | None) -> None:
    """``check_model_source``, its message naming the pool entry (and file) and, for a relative
    path, where it was looked for: a pool's paths are read from the current directory, not the
    pool file's, so a config run from another directory finds none of them."""
    try:
        check_model_source(source)
    except CheckpointError as error:
        where = f"model pool entry '{name}'" + (f" of '{pool_file}'" if pool_file else "")
        hint = ""
        if not Path(source).expanduser().is_absolute():
            hint = (
                f"; a relative path in a model pool is read from the current directory ('{Path.cwd()}'): "
                "run from the directory it is relative to, or make it absolute"
            )
        raise CheckpointError(f"{where}: {error}{hint}") from None


def _check_distinct_sources(sources: Mapping[str, str]) -> None:
    """No two entries name the same checkpoint (the same directory, by its resolved path, or hub id)."""
    seen: dict[str, str] = {}
    for name, source in sources.items():
        local = Path(source).expanduser()
        identity = str(local.resolve()) if local.exists() else source
        if identity in seen:
            first = seen[identity]
            spelt = f"'{source}'" if sources[first] == source else f"'{sources[first]}' and '{source}'"
            raise MergeError(f"the model pool's {first} and {name} are the same checkpoint ({spelt}): {_DISTINCT}")
        seen[identity] = name


def _weights_fingerprint(directory: Path) -> tuple[tuple[str, int, str], ...]:
    """Per weight file of a checkpoint: name, size and a hash of its first and last
    ``_FINGERPRINT_BYTES``."""
    files = sorted([*directory.glob("*.safetensors"), *directory.glob("pytorch_model*.bin")])
    fingerprint = []
    for path in files:
        size = path.stat().st_size
        with path.open("rb") as file:
            digest = hashlib.blake2b(file.read(_FINGERPRINT_BYTES), digest_size=16)
            file.seek(max(0, size - _FINGERPRINT_BYTES))
            digest.update(file.read(_FINGERPRINT_BYTES))
        fingerprint.append((path.name, size, digest.hexdigest()))
    return tuple(fingerprint)


class ModelPool:
    """``_pretrained_`` plus one fine-tuned checkpoint per task, each a hub id or directory.

    A pool of ``_pretrained_`` alone is a pool too: its model and image processor load
    (``load_model``, ``load_processor``); merging it is refused where a merge starts
    (``check_mergeable``).

    Args:
        models: name -> checkpoint, as in FusionBench's model pool YAML (``_pretrained_:
            facebook/convnext-base-224``, ``dtd: tanganke/...``); an entry may also be a mapping
            with ``config_path`` and FusionBench's ``pretrained`` (false: ``load_model`` builds the
            architecture from the config, with random weights) and ``dataset_name`` (the task the
            entry is for: a fine-tuned entry's task, and the task ``load_model`` sizes and labels
            its head for). A string is read as the path of such a YAML file.
        classnames: each task's class names, for ``load_model``'s heads (``ClassNames``): checked
            here for every ``dataset_name``. None: an entry with a ``dataset_name`` loads only
            where its own head is kept (a fine-tuned entry).
    """

    def __init__(
        self, models: Mapping[str, str | Mapping[str, Any]] | str | os.PathLike, classnames: ClassNames | None = None
    ) -> None:
        pool_file = os.fspath(models) if isinstance(models, str | os.PathLike) else None
        if pool_file is not None:
            models = read_pool_file(pool_file)
        if PRETRAINED not in models:
            raise MergeError(f"the model pool has no '{PRETRAINED}' entry (names: {', '.join(models) or 'none'})")
        self.sources: dict[str, str] = {}
        #: task (or ``_pretrained_``) -> how ``load_model`` builds it.
        self.loading: dict[str, _Loading] = {}
        entries: dict[str, str] = {}  # task -> its entry's name in the pool, for messages
        for name, entry in models.items():
            task = (
                name
                if name == PRETRAINED
                else task_key(entry.get("dataset_name") or name if isinstance(entry, Mapping) else name)
            )
            if task in self.sources:
                raise MergeError(f"task '{task}' appears twice in the model pool")
            self.sources[task] = _source_of(name, entry)
            self.loading[task] = _loading_of(str(name), entry)
            entries[task] = str(name)
        for task, source in self.sources.items():
            _check_entry_source(entries[task], source, pool_file)
        self.classnames = classnames
        if classnames is not None:  # an unknown task is named here, before any loading
            for loading in self.loading.values():
                if loading.dataset_name is not None:
                    self.task_classnames(loading.dataset_name)
        self._readers: dict[str, CheckpointReader] = {}
        self._directories: dict[str, Path] = {}
        self._families: dict[str, Architecture] = {}

    def check_mergeable(self) -> None:
        """What a merge needs of the pool besides its files: fine-tuned models, and checkpoint
        weights for every entry (a merge reads them; ``pretrained: false`` would mean random ones)."""
        if not self.task_names:
            raise MergeError("the model pool has no fine-tuned models: add one entry per task besides _pretrained_")
        random = [name for name, loading in self.loading.items() if not loading.pretrained]
        if random:
            verb = "has" if len(random) == 1 else "have"
            raise MergeError(
                f"the model pool's {', '.join(random)} {verb} pretrained: false (random weights from the config), but a "
                "merge reads each checkpoint's weights: remove pretrained: false to merge"
            )

    def task_classnames(self, task: str) -> list[str]:
        """``task``'s class names, in label order, from ``classnames``."""
        if self.classnames is None:
            raise MergeError(
                f"the model pool knows no class names to size a head for task '{task}': build it with "
                "lightning_modules.python_api.model_pool (the task registry's) or ModelPool(..., classnames=...)"
            )
        if callable(self.classnames):
            names = self.classnames(task)
        else:
            known = {task_key(name): names for name, names in self.classnames.items()}
            if task_key(task) not in known:
                raise MergeError(f"no class names for task '{task}' (given for: {', '.join(self.classnames) or 'none'})")
            names = known[task_key(task)]
        return list(names)

    @property
    def task_names(self) -> list[str]:
        return [name for name in self.sources if name != PRETRAINED]

    def directory(self, name: str) -> Path:
        """The checkpoint's local directory, checked on first use to be an image classifier of a
        supported family, the pretrained model's. The pretrained backbone is checked against its
        config; every fine-tuned one is compared with the pretrained one by ``check_backbones``
        (which names both files)."""
        if name not in self._directories:
            directory = resolve_model_dir(self.sources[name])
            family = check_checkpoint(directory, self.sources[name], weights=name == PRETRAINED)
            if name != PRETRAINED:  # (the pretrained one's head: checked with its weights above)
                self._check_family(name, family)
                check_head_config(directory, self.sources[name])
            self._families[name] = family
            self._directories[name] = directory
        return self._directories[name]

    def _check_family(self, name: str, family: Architecture) -> None:
        """A fine-tuned entry is of the pretrained model's family: one error naming both."""
        pretrained = self.architecture
        if family is not pretrained:
            raise MergeError(
                f"the model pool mixes families: {PRETRAINED} ('{self.sources[PRETRAINED]}') is a {pretrained.name}, "
                f"{name} ('{self.sources[name]}') a {family.name}; every model of a pool is fine-tuned from its "
                f"{PRETRAINED}, so all are of one family"
            )

    @property
    def architecture(self) -> Architecture:
        """The pool's family (``common.architectures``): the pretrained model's."""
        self.directory(PRETRAINED)
        return self._families[PRETRAINED]

    @property
    def backbone_prefix(self) -> str:
        """The backbone's key prefix in the pool's checkpoints (ConvNeXt's ``convnext`` and a dot, ResNet's ``resnet`` and a dot, ...: ``Architecture.prefix``)."""
        return self.architecture.prefix

    @property
    def head_keys(self) -> tuple[str, str]:
        """The head's weight and bias keys in the pool's checkpoints."""
        return self.architecture.head_keys

    def reader(self, name: str) -> CheckpointReader:
        if name not in self._readers:
            self._readers[name] = CheckpointReader(self.directory(name))
        return self._readers[name]

    def config(self, name: str = PRETRAINED) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.directory(name))

    def _entry(self, name: str) -> str:
        """``name`` as the pool knows it (a task's spelling, ``_pretrained_``), or a MergeError naming the entries."""
        key = name if name == PRETRAINED else task_key(name)
        if key not in self.sources:
            raise MergeError(f"no model '{name}' in the model pool (models: {', '.join(self.sources)})")
        return key

    def load_model(self, name: str) -> PreTrainedModel:
        """The entry ``name`` (``_pretrained_`` or a task) as its family's Hugging Face
        ``*ForImageClassification`` (``ConvNextForImageClassification``, ...) in float32 and eval mode,
        as FusionBench's ConvNeXt pool builds it: the checkpoint's weights, or (``pretrained: false``)
        its architecture with random weights. With a ``dataset_name``, the head is that task's, ``num_labels``, ``id2label`` and
        ``label2id`` its class names: a fine-tuned entry keeps its own trained head, which must be
        the task's (class count and labels); any other (``_pretrained_``'s 1,000 ImageNet classes, or
        random weights) is replaced by a freshly initialised head of the task's size
        (``Architecture.new_head``), the fine-tuning recipe's start. The forward is the model's own (``.logits`` of its output)."""
        name = self._entry(name)
        loading, source = self.loading[name], self.sources[name]
        directory = resolve_model_dir(source)
        family = check_checkpoint(directory, source, weights=loading.pretrained)
        if name != PRETRAINED:
            self._check_family(name, family)
        if loading.pretrained:
            model = family.classifier_class.from_pretrained(directory, dtype=torch.float32)
        else:
            model = family.classifier_class(AutoConfig.from_pretrained(directory))
        if loading.dataset_name is not None:
            classnames = self.task_classnames(loading.dataset_name)
            if name != PRETRAINED and loading.pretrained:
                check_head_labels(model.config, classnames, source)
            else:
                family.replace_head(model, len(classnames))
            model.config.num_labels = len(classnames)
            model.config.id2label = dict(enumerate(classnames))
            model.config.label2id = {label: index for index, label in enumerate(classnames)}
        return model.eval()

    def load_processor(self) -> Any:
        """The image processor of ``_pretrained_`` (``AutoImageProcessor``): the preprocessing every
        model of the pool was trained with."""
        source = self.sources[PRETRAINED]
        directory = resolve_model_dir(source)
        if not (directory / "preprocessor_config.json").is_file():
            raise CheckpointError(f"checkpoint '{source}' of the model pool's {PRETRAINED} has no preprocessor_config.json")
        try:
            return AutoImageProcessor.from_pretrained(directory)
        except Exception as error:  # a broken file: one line naming it
            raise CheckpointError(f"cannot load the image processor of '{source}': {type(error).__name__}: {error}") from error

    def save_model(self, model: PreTrainedModel, directory: str | Path, overwrite: bool = False) -> None:
        """``model`` as a Hugging Face checkpoint in ``directory`` (``save_pretrained``: weights,
        ``config.json``) with the pool's image processor, so that ``from_pretrained`` and
        ``pipeline("image-classification")`` load it; whole or not at all, and an existing
        ``directory`` only replaced with ``overwrite``."""
        processor = self.load_processor()

        def write(staging: Path) -> None:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)

        write_atomically(Path(directory), write, overwrite, flag="overwrite=True")

    @cached_property
    def backbone_keys(self) -> list[str]:
        prefix = self.backbone_prefix
        keys = [key for key in self.reader(PRETRAINED).keys() if key.startswith(prefix)]
        if not keys:
            raise CheckpointError(f"checkpoint '{self.sources[PRETRAINED]}' has no '{prefix}*' backbone tensors")
        return keys

    @cached_property
    def counter_keys(self) -> list[str]:
        """The backbone tensors that are integer counters, not weights (BatchNorm's
        ``num_batches_tracked``, which no forward of a trained model reads): no method merges
        them, and a merged backbone keeps the pretrained model's."""
        reader = self.reader(PRETRAINED)
        return [key for key in self.backbone_keys if not reader.dtype(key).is_floating_point]

    @property
    def merge_keys(self) -> list[str]:
        """The backbone tensors a method merges: every floating-point one (parameters, and buffers
        such as BatchNorm's running mean and variance, which are part of the network's function as
        its weights are: FusionBench averages them with the rest of the state dict)."""
        counters = set(self.counter_keys)
        return [key for key in self.backbone_keys if key not in counters]

    @cached_property
    def network_keys(self) -> list[str]:
        """``backbone_keys`` (the file's alphabetical order) in the network's order, input to output."""
        position = {key: index for index, key in enumerate(network_order(self.directory(PRETRAINED)))}
        return sorted(self.backbone_keys, key=lambda key: position.get(key, len(position)))

    def check_backbones(self) -> None:
        """Every fine-tuned backbone has the pretrained one's keys and shapes."""
        reference = self.reader(PRETRAINED)
        expected = {key: reference.shape(key) for key in self.backbone_keys}
        for task in self.task_names:
            reader = self.reader(task)
            keys = {key for key in reader.keys() if key.startswith(self.backbone_prefix)}
            missing, extra = sorted(expected.keys() - keys), sorted(keys - expected.keys())
            if missing or extra:
                detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
                raise MergeError(f"backbone of '{reader.directory}' ({task}) differs from the pretrained one: {detail}")
            for key, shape in expected.items():
                if reader.shape(key) != shape:
                    raise MergeError(
                        f"shape mismatch for '{key}': {list(reader.shape(key))} in '{reader.path_of(key)}' ({task}) "
                        f"vs {list(shape)} in '{reference.path_of(key)}' (pretrained)"
                    )

    def head(self, task: str) -> dict[str, torch.Tensor]:
        """The fine-tuned classifier of ``task``: ``{"weight", "bias"}`` of its head's ``Linear``
        (``classifier.*``; ResNet's ``classifier.1.*``)."""
        reader = self.reader(task)
        keys = dict(zip(("weight", "bias"), self.head_keys))
        for key in keys.values():
            if key not in reader:
                raise CheckpointError(f"checkpoint '{reader.directory}' ({task}) has no '{key}'")
        head = {name: reader.read(key).to(torch.float32) for name, key in keys.items()}
        for name, tensor in head.items():
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"non-finite values (NaN/Inf) in '{keys[name]}' of '{reader.path_of(keys[name])}'")
        return head

    def check_distinct(self, contents: bool = True) -> None:
        """No two entries are one checkpoint: a task merged and scored twice with one model, or a
        ``_pretrained_`` that is a task's fine-tune (a zero task vector), merge without a word
        otherwise. (The pool itself holds any entries: the engine merges a pool of one model
        three times as well; the merge-side modules ask for this.) First by name, reading no
        file: the same directory (resolved) or hub id twice. Then, with ``contents``, copies:
        weight files of the same names and sizes whose first and last MiB are equal. Reading
        2 MiB per file instead of hashing whole checkpoints (350 MB each for convnext-base) is
        enough: safetensors stores tensors in key order, ``classifier.*`` first (before every family's backbone prefix), and two
        fine-tunes differ there (each head trained from its own random start) and in the
        backbone tensors that follow, as a fine-tune differs from its pretrained model."""
        _check_distinct_sources(self.sources)
        if not contents:
            return
        seen: dict[tuple, str] = {}
        for name in self.sources:
            fingerprint = _weights_fingerprint(self.directory(name))
            if not fingerprint:  # no weights at all: the reader says so, once it is asked
                continue
            if fingerprint in seen:
                first = seen[fingerprint]
                raise MergeError(
                    f"the model pool's {first} ('{self.sources[first]}') and {name} ('{self.sources[name]}') are copies "
                    f"of one checkpoint (identical weight files): {_DISTINCT}"
                )
            seen[fingerprint] = name

    def check_heads(self, classnames: Mapping[str, list[str]]) -> None:
        """Every task to evaluate has a fine-tuned head of its class count (and labels)."""
        for task, names in classnames.items():
            if task not in self.sources or task == PRETRAINED:
                raise MergeError(f"no fine-tuned model for task '{task}' in the model pool (tasks: {', '.join(self.task_names)})")
            reader, head_weight = self.reader(task), self.head_keys[0]
            shape = reader.shape(head_weight) if head_weight in reader else None
            if shape is None or shape[0] != len(names):
                raise MergeError(
                    f"head of '{reader.path_of(head_weight)}' is {list(shape) if shape else 'missing'}, "
                    f"but task '{task}' has {len(names)} classes"
                )
            check_head_labels(self.config(task), names, self.sources[task])
