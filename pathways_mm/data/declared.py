"""Tasks declared in an experiment config (`declare:`): made from data files, without Python.

    declare:
      captions:
        inputs: {image: image}          # field -> modality, in order
        prompt: "what digits?"          # optional text after the inputs
        target: caption                 # the field holding the answer
        metrics: [exact_match, char_error_rate]
        splits:
          train: {path: data/train.jsonl}
          test: {path: data/test.jsonl}

Each declaration becomes a Task subclass in the registry (`pathways-mm tasks --config` lists
it with its source), so every command that takes tasks takes it. The declaration travels in the
config that checkpoints store, so `eval`, `export` and `add-task` rebuild the same task from a
checkpoint; being data, not code, it is safe to load from someone else's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pathways_mm.config import DeclaredTaskConfig, ExperimentConfig, SourceConfig
from pathways_mm.data.sources import BadSample, MediaRules, Row, Source, open_source, source_format
from pathways_mm.data.sources.base import DEFAULT_RULES
from pathways_mm.data.sources.media import decode_audio, decode_image
from pathways_mm.errors import ConfigError
from pathways_mm.tasks.base import GenerationConfig, MultimodalExample, Task
from pathways_mm.tasks.multimodal import blind_chance
from pathways_mm.tasks.registry import list_tasks, register_declared

CHANCE_ROWS = 2000  # training targets read (evenly spaced) to find the most common answer


class DeclaredTask(Task):
    """A task whose samples are rows of a data source; subclasses are made by `declared_class`."""

    declared: ClassVar[bool] = True
    spec: ClassVar[DeclaredTaskConfig]
    sample_rate: ClassVar[int]  # the model's: audio fields are resampled to it
    rules: ClassVar[MediaRules]  # where media files may be, how large media may be (the config's)
    _sources: ClassVar[dict[tuple[str, str], Source]]  # (split, data root) -> the open source

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.spec.inputs, self.spec.target]))

    def open_split(self, split: str, root: Path) -> Source:
        """The split's source, opened (its index built or read) once per process."""
        key = (split, str(root))
        if key not in self._sources:
            self._sources[key] = open_source(self.spec.splits[split], self.fields, split, Path(root), self.rules)
        return self._sources[key]

    def build_dataset(self, split: str, root: Path, seed: int) -> Source:
        return self.open_split(split, root)

    def encode(self, sample: Row) -> MultimodalExample:
        segments: list[tuple[str, Any]] = []
        for field, modality in self.spec.inputs.items():
            if modality == "image":
                segments.append(("image", decode_image(sample, field)))
            elif modality == "audio":
                segments.append(("audio", decode_audio(sample, field, self.sample_rate)))
            else:
                segments.append(("text", text_field(sample, field)))
        if self.spec.prompt:
            segments.append(("text", self.spec.prompt))
        return MultimodalExample(
            task=self.name, segments=tuple(segments), target_text=text_field(sample, self.spec.target)
        )

    def chance(self, metric: str, train: Sequence[Any], test: Sequence[Any]) -> float | None:
        rows = np.linspace(0, len(train) - 1, min(len(train), CHANCE_ROWS)).round().astype(int)
        train_targets = [t for i in dict.fromkeys(rows.tolist()) if (t := self._target(train, i)) is not None]
        test_targets = [t for i in range(len(test)) if (t := self._target(test, i)) is not None]
        return blind_chance(metric, train_targets, test_targets)

    def _target(self, split: Sequence[Any], i: int) -> str | None:
        """Row i's answer (reading no other field), or None for a bad row."""
        try:
            row = split.read(i, [self.spec.target]) if hasattr(split, "read") else split[i]
            return text_field(row, self.spec.target)
        except BadSample:
            return None

    def __reduce__(self):  # DataLoader workers started with spawn rebuild the class from its declaration
        return (_instance, (self.name, self.spec, self.sample_rate, self.rules))


def text_field(row: Row, field: str) -> str:
    """A field as text: strings as they are (stripped), file bytes as UTF-8, numbers written out."""
    value = row.fields[field]
    if isinstance(value, (bytes, bytearray)):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample(f"{row.where}: field {field!r} is not UTF-8 text") from None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadSample(f"{row.where}: field {field!r} holds {type(value).__name__}; expected text")
    return str(value).strip()


def declared_class(
    name: str, spec: DeclaredTaskConfig, sample_rate: int, rules: MediaRules = DEFAULT_RULES
) -> type[DeclaredTask]:
    modalities = tuple(dict.fromkeys(spec.inputs.values())) or ("text",)
    inputs = ", ".join(f"{f}:{m}" for f, m in spec.inputs.items())
    attrs = {
        "name": name,
        "spec": spec,
        "sample_rate": sample_rate,
        "rules": rules,
        "modalities": modalities,
        "metrics": tuple(spec.metrics),
        "splits": tuple(spec.splits),
        "generation": GenerationConfig(max_new_tokens=spec.max_new_tokens),
        "description": spec.description or f"{inputs} -> {spec.target}",
        "_sources": {},
        "__module__": __name__,
    }
    return type(f"Declared_{name}", (DeclaredTask,), attrs)


def _instance(name: str, spec: DeclaredTaskConfig, sample_rate: int, rules: MediaRules) -> DeclaredTask:
    return declared_class(name, spec, sample_rate, rules)()


def declare_tasks(cfg: ExperimentConfig) -> None:
    """Register the tasks `cfg` declares (again only if a declaration changed)."""
    registered = {info.name: info for info in list_tasks()}
    rate, rules = cfg.model.audio.sample_rate, MediaRules.from_config(cfg)
    for name, spec in cfg.declare.items():
        old = registered.get(name)
        if (
            old is not None
            and getattr(old.cls, "declared", False)
            and (old.cls.spec, old.cls.sample_rate, old.cls.rules) == (spec, rate, rules)
        ):
            continue
        where = f"declared in {cfg.source}" if cfg.source else "declared in a checkpoint's config"
        register_declared(declared_class(name, spec, rate, rules), f"{where} ({describe(spec.splits['train'])})")


def describe(src: SourceConfig) -> str:
    """A source's format and path ("jsonl /data/train.jsonl"), for listings."""
    try:
        return f"{source_format(src)} {src.path}"
    except ConfigError:  # the data is not on this machine: the listing still names where it was
        return src.path
