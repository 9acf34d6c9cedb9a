"""Language modelling on the King James Bible: predict a chunk of text, scored in bits per byte."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathways_mm.tasks.base import MultimodalExample, Task
from pathways_mm.tasks.corpus import split_blocks
from pathways_mm.tasks.registry import register_task

MIN_CHARS, MAX_CHARS = 150, 350


def chunk_text(text: str, rng: random.Random) -> list[str]:
    """Cut `text` into consecutive chunks of about MIN_CHARS..MAX_CHARS, at whitespace.

    A chunk never starts or ends with whitespace; a tail shorter than MIN_CHARS is dropped.
    """
    chunks, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if len(text) - pos < MIN_CHARS:
            return chunks
        end = pos + rng.randint(MIN_CHARS, MAX_CHARS)
        if end < len(text):
            cut = max(text.rfind(" ", pos, end + 1), text.rfind("\n", pos, end + 1))
            end = cut if cut > pos + MIN_CHARS // 2 else end  # no space in reach: cut mid-word
        chunks.append(text[pos:end].rstrip())
        pos = end


@register_task
class TextLM(Task):
    """Unconditional text: an empty prompt, the target is 150-350 characters of KJV text.

    Train chunks come from train paragraphs, test chunks from test paragraphs (a blocked split
    of the corpus, see tasks/corpus.py). Paragraphs of a block are joined with newlines and the
    block is chunked on its own, so a chunk never spans the train/test border.
    """

    name = "text_lm"
    modalities = ("text",)
    metrics = ("bits_per_byte",)
    description = "KJV language modelling (bits per UTF-8 byte of the target)"
    data_version = 1
    num_samples = {"train": 8000, "test": 400}

    def build_dataset(self, split: str, root: Path, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(f"text_lm/{split}/{seed}")
        chunks = [c for block in split_blocks(split) for c in chunk_text("\n".join(block), rng)]
        # a random order: evaluation reads a prefix of the test split, which must be representative
        return [{"text": c} for c in rng.sample(chunks, min(self.num_samples[split], len(chunks)))]

    def encode(self, sample: dict[str, Any]) -> MultimodalExample:
        return MultimodalExample(task=self.name, segments=(("text", ""),), target_text=sample["text"])

    def chance(self, metric: str, train: Sequence[Any], test: Sequence[Any]) -> float | None:
        """8.0 bits per byte: a uniform guess over the 256 byte values, knowing nothing of text."""
        return 8.0 if metric == "bits_per_byte" else None
