"""Arithmetic word problems with operands in words ("what is twelve minus five?" -> "7")."""

from __future__ import annotations

import collections
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathways_mm.tasks.base import GenerationConfig, MultimodalExample, Task
from pathways_mm.tasks.corpus import number_words
from pathways_mm.tasks.registry import register_task

# op -> (largest operand, answer); small enough for a tiny model trained minutes on a CPU
OPS = {
    "plus": (20, lambda a, b: a + b),
    "minus": (20, lambda a, b: a - b),  # only a >= b: answers stay non-negative
    "times": (9, lambda a, b: a * b),
}
NOUNS = {"plus": "sum", "minus": "difference", "times": "product"}
VERBS = {"plus": "add {a} and {b}", "minus": "subtract {b} from {a}", "times": "multiply {a} by {b}"}
TRAIN_TEMPLATES = ("{a} {op} {b}", "what is {a} {op} {b}?", "{verb}", "the {noun} of {a} and {b} is")
# paraphrases that only test sees: known phrases in a new frame
TEST_TEMPLATES = ("what is the {noun} of {a} and {b}?", "how much is {a} {op} {b}?")
HELDOUT_PERCENT = 20


def triples() -> list[tuple[str, int, int]]:
    """Every (op, a, b) the task asks about."""
    out = []
    for op, (top, _) in OPS.items():
        out += [(op, a, b) for a in range(top + 1) for b in range(top + 1) if op != "minus" or a >= b]
    return out


def is_heldout(op: str, a: int, b: int) -> bool:
    """About 20% of the plus/minus pairs never appear in train; fixed by a hash, not by the seed,
    so train and test built with different seeds still share no pair. Products are facts to
    memorise, not to infer, so no product is held out (test asks them in new phrasings)."""
    if op == "times":
        return False
    digest = hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def render(template: str, op: str, a: int, b: int) -> dict[str, Any]:
    wa, wb = number_words(a), number_words(b)
    fields = dict(a=wa, b=wb, op=op, noun=NOUNS[op], verb=VERBS[op].format(a=wa, b=wb))
    return {"prompt": template.format(**fields), "answer": str(OPS[op][1](a, b))}


@register_task
class TextArith(Task):
    """Add, subtract (a >= b) and multiply small numbers written as words; answer in digits.

    Train: every non-held-out pair in every train template, shuffled. Test probes
    generalisation: each held-out pair once in a train template ("pair") and once in a
    test-only template ("both"), plus 150 train pairs in a test-only template ("template").
    """

    name = "text_arith"
    modalities = ("text",)
    metrics = ("exact_match",)
    generation = GenerationConfig(max_new_tokens=6)
    description = "arithmetic word problems, operands in words, answer in digits"
    data_version = 2
    num_seen_pair_tests = 150

    def build_dataset(self, split: str, root: Path, seed: int) -> list[dict[str, Any]]:
        if split not in self.splits:
            raise ValueError(f"text_arith has no split {split!r}; it has {list(self.splits)}")
        rng = random.Random(f"text_arith/{split}/{seed}")
        seen = [t for t in triples() if not is_heldout(*t)]
        if split == "train":
            samples = [render(tpl, *t) for t in seen for tpl in TRAIN_TEMPLATES]
            rng.shuffle(samples)
            return samples
        samples = []
        for t in triples():
            if is_heldout(*t):
                samples.append({**render(rng.choice(TRAIN_TEMPLATES), *t), "heldout": "pair"})
                samples.append({**render(rng.choice(TEST_TEMPLATES), *t), "heldout": "both"})
        for t in rng.sample(seen, self.num_seen_pair_tests):
            samples.append({**render(rng.choice(TEST_TEMPLATES), *t), "heldout": "template"})
        rng.shuffle(samples)  # evaluation reads a prefix of the test split, which must be representative
        return samples

    def encode(self, sample: dict[str, Any]) -> MultimodalExample:
        return MultimodalExample(task=self.name, segments=(("text", sample["prompt"]),), target_text=sample["answer"])

    def group(self, sample: dict[str, Any]) -> str | None:
        """ "pair" (unseen operands), "template" (unseen phrasing) or "both"; None in train."""
        return sample.get("heldout")

    def chance(self, metric: str, train: Sequence[Any], test: Sequence[Any]) -> float | None:
        """Exact match of always answering the most common test answer (the best blind guess)."""
        if metric != "exact_match" or not test:
            return None
        counts = collections.Counter(s["answer"] for s in test)
        return counts.most_common(1)[0][1] / len(test)
