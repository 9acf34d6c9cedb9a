"""The Task API: what a task is and the example it hands to the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pathways_mm.metrics import METRICS  # noqa: F401  (part of the Task API: what `metrics` may list)

MODALITIES = ("text", "image", "audio")


@dataclass(frozen=True)
class MultimodalExample:
    """One input/answer pair: modality segments (in order) before the answer text.

    `segments` holds `(modality, raw)` pairs; for `"text"` the raw value is the prompt string.
    """

    task: str
    segments: tuple[tuple[str, Any], ...]
    target_text: str


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 8
    # Evaluation compares generated text with the target after `str.strip()`.


class Task:
    """A task spec. Subclass, fill the class attributes and the two methods, decorate with
    `@register_task`.

    Required: `name`, `modalities` (subset of MODALITIES), `metrics` (subset of METRICS),
    `build_dataset(split, root, seed) -> list of samples` (offline, deterministic, JSON-able
    samples) and `encode(sample) -> MultimodalExample`.
    """

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]]
    metrics: ClassVar[tuple[str, ...]]
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    generation: ClassVar[GenerationConfig] = GenerationConfig()
    description: ClassVar[str] = ""
    # Part of each split's cache name: a split is built once per (task, split, seed, data_version),
    # so raise it when build_dataset changes, or the old cached split is read as before.
    data_version: ClassVar[int] = 1

    def build_dataset(self, split: str, root: Path, seed: int) -> Sequence[Any]:
        raise NotImplementedError

    def encode(self, sample: Any) -> MultimodalExample:
        raise NotImplementedError

    def bind(self, root: Path, seed: int) -> None:
        """Called with the data location before any sample is encoded: a task whose samples point
        into media banks built under `root` (images, audio) reads them from there."""
        self.root, self.seed = Path(root), seed

    def segments_for(self, inputs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        """The segments the model reads for a user's own inputs ({modality: raw}, as `encode`
        would lay out a sample holding them): by default, in the order of `modalities`. A task
        whose `encode` adds fixed text (an instruction around the user's input) overrides it."""
        return tuple((m, inputs[m]) for m in self.modalities if m in inputs)

    def final_answer(self, text: str) -> str:
        """The part of an output the metrics score (default: all of it, stripped).

        A task whose targets write out intermediate steps before the answer (a scratchpad, as in
        "7 3 no") returns just the answer here; evaluation applies it to output and target alike.
        """
        return text.strip()

    def group(self, sample: Any) -> str | None:
        """Optional label of a test sample (e.g. what it holds out); evaluation reports each group."""
        return None

    def chance(self, metric: str, train: Sequence[Any], test: Sequence[Any]) -> float | None:
        """The metric a guesser reaches without looking at the input (None where undefined)."""
        return None

    def __repr__(self) -> str:
        return f"<Task {self.name} {'+'.join(self.modalities)}>"


@dataclass(frozen=True)
class TaskInfo:
    """A registered task and where it came from (builtin module, entry point or plugin)."""

    name: str
    cls: type[Task]
    source: str

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.cls.modalities)
