"""The built-in image and speech tasks: one model that knows "seven" whether it sees it or hears it.

Samples are small JSON records that point into media banks (tasks/digits.py, tasks/speech.py)
built once under the data root; `encode` fetches the pixels and samples. Test samples come from
the test banks: digit images no training sample shows, voices training never hears.
"""

from __future__ import annotations

import collections
import functools
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathways_mm.encoders.audio import Audio
from pathways_mm.metrics import edit_distance
from pathways_mm.tasks.base import GenerationConfig, MultimodalExample, Task
from pathways_mm.tasks.corpus import number_words
from pathways_mm.tasks.digits import ImageBank, digit_images
from pathways_mm.tasks.registry import register_task
from pathways_mm.tasks.speech import AudioBank, spoken_digits, spoken_numbers

PAIRED_SIZES = {"train": 6000, "test": 500}  # tasks that combine bank items draw this many


@functools.cache
def _images(root: Path, split: str, seed: int) -> ImageBank:
    return digit_images(split, root, seed)


@functools.cache
def _digits_audio(root: Path, split: str, seed: int) -> AudioBank:
    return spoken_digits(split, root, seed)


@functools.cache
def _numbers_audio(root: Path, split: str, seed: int) -> AudioBank:
    return spoken_numbers(split, root, seed)


def blind_chance(metric: str, train_targets: Sequence[str], test_targets: Sequence[str]) -> float | None:
    """The metric of always answering the most common training answer (the best blind guess)."""
    if not train_targets or not test_targets:
        return None
    guess = collections.Counter(train_targets).most_common(1)[0][0]
    if metric == "exact_match":
        return sum(t == guess for t in test_targets) / len(test_targets)
    if metric == "char_error_rate":
        return sum(edit_distance(guess, t) for t in test_targets) / max(1, sum(len(t) for t in test_targets))
    return None


class _MediaTask(Task):
    """Shared plumbing: bank access, shuffled index lists, chance from the targets."""

    metrics = ("exact_match",)
    generation = GenerationConfig(max_new_tokens=4)

    def _rng(self, split: str, seed: int) -> random.Random:
        return random.Random(f"{self.name}/{split}/{seed}")

    def image(self, split: str, index: int) -> np.ndarray:
        return _images(self.root, split, self.seed).images[index]

    def clip(self, bank: AudioBank, index: int) -> Audio:
        return Audio(bank.audio[index], bank.sample_rate)

    def chance(self, metric: str, train: Sequence[Any], test: Sequence[Any]) -> float | None:
        return blind_chance(metric, [s["answer"] for s in train], [s["answer"] for s in test])


@register_task
class DigitImage(_MediaTask):
    """A handwritten digit -> its English word ("seven")."""

    name = "digit_image"
    modalities = ("image",)
    description = "handwritten digit image -> the digit's word"

    def build_dataset(self, split: str, root: Path, seed: int) -> list[dict[str, Any]]:
        bank = _images(Path(root), split, seed)
        order = list(range(len(bank)))
        self._rng(split, seed).shuffle(order)
        return [{"split": split, "image": i, "answer": number_words(int(bank.labels[i]))} for i in order]

    def encode(self, sample: dict[str, Any]) -> MultimodalExample:
        img = self.image(sample["split"], sample["image"])
        return MultimodalExample(task=self.name, segments=(("image", img),), target_text=sample["answer"])


class _SpeechTask(_MediaTask):
    """One clip of a speech bank -> the digits spoken."""

    modalities = ("audio",)

    def bank(self, split: str, root: Path, seed: int) -> AudioBank:
        raise NotImplementedError

    def build_dataset(self, split: str, root: Path, seed: int) -> list[dict[str, Any]]:
        bank = self.bank(split, root, seed)
        order = list(range(len(bank.texts)))
        self._rng(split, seed).shuffle(order)
        return [{"split": split, "clip": i, "answer": str(bank.texts[i])} for i in order]

    def encode(self, sample: dict[str, Any]) -> MultimodalExample:
        clip = self.clip(self.bank(sample["split"], self.root, self.seed), sample["clip"])
        return MultimodalExample(task=self.name, segments=(("audio", clip),), target_text=sample["answer"])


@register_task
class DigitSpeech(_SpeechTask):
    """A spoken digit -> the digit ("7")."""

    name = "digit_speech"
    description = "spoken digit (unseen voices in test) -> the digit"

    def bank(self, split: str, root: Path, seed: int) -> AudioBank:
        return _digits_audio(Path(root), split, seed)


@register_task
class SpeechNumbers(_SpeechTask):
    """Spoken digit strings ("three one four") -> the digits ("314")."""

    name = "speech_numbers"
    metrics = ("exact_match", "char_error_rate")
    generation = GenerationConfig(max_new_tokens=7)
    description = "2-5 spoken digits (unseen voices in test) -> the digits"

    def bank(self, split: str, root: Path, seed: int) -> AudioBank:
        return _numbers_audio(Path(root), split, seed)

    def group(self, sample: dict[str, Any]) -> str | None:
        return f"{len(sample['answer'])} digits"


@register_task
class ImageCaption(_MediaTask):
    """A strip of 2-4 handwritten digits, side by side in one image -> the digits ("314")."""

    name = "image_caption"
    modalities = ("image",)
    metrics = ("exact_match", "char_error_rate")
    generation = GenerationConfig(max_new_tokens=6)
    description = "a strip of 2-4 digit images -> the digits"

    def build_dataset(self, split: str, root: Path, seed: int) -> list[dict[str, Any]]:
        bank = _images(Path(root), split, seed)
        rng = self._rng(split, seed)
        out = []
        for _ in range(PAIRED_SIZES[split]):
            idx = [rng.randrange(len(bank)) for _ in range(rng.randint(2, 4))]
            out.append({"split": split, "images": idx, "answer": "".join(str(int(bank.labels[i])) for i in idx)})
        return out

    def encode(self, sample: dict[str, Any]) -> MultimodalExample:
        strip = np.concatenate([self.image(sample["split"], i) for i in sample["images"]], axis=1)
        return MultimodalExample(task=self.name, segments=(("image", strip),), target_text=sample["answer"])

    def group(self, sample: dict[str, Any]) -> str | None:
        return f"{len(sample['images'])} digits"


class _ImageAndSpeech(_MediaTask):
    """An image of one digit and a spoken digit (an unseen voice in test).

    The target writes out both digits before the answer, a scratchpad ("7 3 no", "7+3=10"): the
    model reads each digit as digit_image and digit_speech teach it, then answers from two tokens
    it has just written. Trained on the answer alone, a small model sees an XOR of two ten-way
    recognitions with no partial credit and stays at chance. Metrics score only the answer
    (`final_answer`), so chance is still the best blind guess at the answer.
    """

    modalities = ("image", "audio")
    generation = GenerationConfig(max_new_tokens=8)

    def answer(self, seen: int, heard: int) -> str:
        raise NotImplementedError

    def target(self, seen: int, heard: int) -> str:
        raise NotImplementedError

    def final_answer(self, text: str) -> str:
        return re.split(r"[\s=]+", text.strip())[-1]

    def pair(self, rng: random.Random, images: ImageBank, audio: AudioBank) -> tuple[int, int]:
        return rng.randrange(len(images)), rng.randrange(len(audio.texts))

    def build_dataset(self, split: str, root: Path, seed: int) -> list[dict[str, Any]]:
        images, audio = _images(Path(root), split, seed), _digits_audio(Path(root), split, seed)
        rng = self._rng(split, seed)
        out = []
        for _ in range(PAIRED_SIZES[split]):
            i, j = self.pair(rng, images, audio)
            answer = self.answer(int(images.labels[i]), int(audio.texts[j]))
            out.append({"split": split, "image": i, "clip": j, "answer": answer})
        return out

    def encode(self, sample: dict[str, Any]) -> MultimodalExample:
        split = sample["split"]
        bank = _digits_audio(self.root, split, self.seed)
        img, clip = self.image(split, sample["image"]), self.clip(bank, sample["clip"])
        seen, heard = int(_images(self.root, split, self.seed).labels[sample["image"]]), int(bank.texts[sample["clip"]])
        target = self.target(seen, heard)
        assert self.final_answer(target) == sample["answer"], (target, sample["answer"])
        return MultimodalExample(task=self.name, segments=(("image", img), ("audio", clip)), target_text=target)


@register_task
class ImageSpeechSame(_ImageAndSpeech):
    """Is the digit in the image the digit that was spoken? -> "7 3 no" / "7 7 yes" (half each)."""

    name = "image_speech_same"
    description = "digit image + spoken digit -> yes/no, the same digit?"

    def answer(self, seen: int, heard: int) -> str:
        return "yes" if seen == heard else "no"

    def target(self, seen: int, heard: int) -> str:
        return f"{seen} {heard} {self.answer(seen, heard)}"

    def pair(self, rng: random.Random, images: ImageBank, audio: AudioBank) -> tuple[int, int]:
        i = rng.randrange(len(images))
        same = rng.random() < 0.5
        want = int(images.labels[i])
        while True:  # rejection keeps the voice draw uniform within the wanted answer
            j = rng.randrange(len(audio.texts))
            if (int(audio.texts[j]) == want) == same:
                return i, j


@register_task
class ImageSpeechSum(_ImageAndSpeech):
    """The digit seen plus the digit heard -> their sum, "7+5=12"."""

    name = "image_speech_sum"
    description = "digit image + spoken digit -> their sum"

    def answer(self, seen: int, heard: int) -> str:
        return str(seen + heard)

    def target(self, seen: int, heard: int) -> str:
        return f"{seen}+{heard}={seen + heard}"
