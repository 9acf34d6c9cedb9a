"""The built-in text tasks and their corpus: disjoint splits, determinism, encoding, chance."""

from __future__ import annotations

import json
import random

import pytest

from pathways_mm.tasks import MultimodalExample, corpus, get_task
from pathways_mm.tasks.text_arith import TEST_TEMPLATES, is_heldout, render, triples
from pathways_mm.tasks.text_lm import MAX_CHARS, chunk_text


@pytest.fixture(scope="module")
def built():
    """Both splits of both tasks for seed 0."""
    return {
        name: {split: get_task(name).build_dataset(split, None, 0) for split in ("train", "test")}
        for name in ("text_lm", "text_arith")
    }


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (21, "twenty-one"),
        (99, "ninety-nine"),
        (100, "one hundred"),
        (105, "one hundred and five"),
        (321, "three hundred and twenty-one"),
        (1000, "one thousand"),
        (1005, "one thousand and five"),
        (1234, "one thousand two hundred and thirty-four"),
        (20_020, "twenty thousand and twenty"),
        (999_999, "nine hundred and ninety-nine thousand nine hundred and ninety-nine"),
    ],
)
def test_number_words(n, words):
    assert corpus.number_words(n) == words


@pytest.mark.parametrize("n", [-1, 1_000_000])
def test_number_words_range(n):
    with pytest.raises(ValueError):
        corpus.number_words(n)


def test_number_text_is_seeded():
    assert corpus.number_text(1, 50) == corpus.number_text(1, 50)
    assert corpus.number_text(1, 50) != corpus.number_text(2, 50)
    assert any("hundred" in line for line in corpus.number_text(0, 200))


def test_corpus_is_clean_and_split_by_blocks():
    paragraphs = corpus.corpus_paragraphs()
    assert len(paragraphs) > 4000
    assert not any(c in p for p in paragraphs for c in "[]")
    assert max(map(len, paragraphs)) < 4000  # sentencepiece skips longer sentences
    train, test = corpus.split_paragraphs("train"), corpus.split_paragraphs("test")
    assert len(train) + len(test) == len(paragraphs)
    assert not set(train) & set(test)
    assert 0.03 < len(test) / len(paragraphs) < 0.1


def test_text_lm_splits_share_no_paragraph(built):
    train_text = "\n".join(corpus.split_paragraphs("train"))
    for sample in built["text_lm"]["test"]:
        assert sample["text"] not in train_text
    assert not {s["text"] for s in built["text_lm"]["train"]} & {s["text"] for s in built["text_lm"]["test"]}


def test_text_lm_chunks(built):
    train, test = built["text_lm"]["train"], built["text_lm"]["test"]
    assert len(train) >= 3000 and 200 <= len(test) <= 1000
    for s in train + test:
        assert 75 <= len(s["text"]) <= MAX_CHARS
        assert s["text"] == s["text"].strip()


def test_chunk_text_cuts_at_spaces():
    text = " ".join(f"word{i}" for i in range(400))
    chunks = chunk_text(text, random.Random(0))
    assert " ".join(chunks) == text[: len(" ".join(chunks))]  # consecutive, nothing lost but the tail
    assert all(c.startswith("word") and c[-1].isdigit() for c in chunks)


def test_text_arith_heldout_pairs_never_in_train(built):
    heldout = [t for t in triples() if is_heldout(*t)]
    assert 0.15 < len(heldout) / len(triples()) < 0.25
    train_prompts = {s["prompt"] for s in built["text_arith"]["train"]}
    test = built["text_arith"]["test"]
    assert not train_prompts & {s["prompt"] for s in test}
    words = {corpus.number_words(n) for n in range(21)}
    for s in built["text_arith"]["train"]:
        operands = [w for w in s["prompt"].rstrip("?").split() if w in words]
        assert len(operands) == 2
    for kind in ("pair", "template", "both"):
        assert sum(s["heldout"] == kind for s in test) >= 100


def test_text_arith_test_only_templates(built):
    frames = [t.split("{")[0] for t in TEST_TEMPLATES]  # "what is the ", "how much is "
    assert all(frames)
    assert not any(s["prompt"].startswith(tuple(frames)) for s in built["text_arith"]["train"])
    for frame in frames:
        assert any(s["prompt"].startswith(frame) for s in built["text_arith"]["test"])


@pytest.mark.parametrize(
    "template, op, a, b, sample",
    [
        ("{a} {op} {b}", "plus", 3, 4, {"prompt": "three plus four", "answer": "7"}),
        ("what is {a} {op} {b}?", "minus", 12, 5, {"prompt": "what is twelve minus five?", "answer": "7"}),
        ("{verb}", "plus", 6, 9, {"prompt": "add six and nine", "answer": "15"}),
        ("{verb}", "minus", 20, 1, {"prompt": "subtract one from twenty", "answer": "19"}),
        ("the {noun} of {a} and {b} is", "times", 9, 3, {"prompt": "the product of nine and three is", "answer": "27"}),
    ],
)
def test_text_arith_render(template, op, a, b, sample):
    assert render(template, op, a, b) == sample


def test_text_arith_sizes(built):
    assert len(built["text_arith"]["train"]) >= 2000
    assert 200 <= len(built["text_arith"]["test"]) <= 1000
    assert all(s["answer"].isdigit() for s in built["text_arith"]["train"] + built["text_arith"]["test"])


@pytest.mark.parametrize("name", ["text_lm", "text_arith"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_builds_are_deterministic_and_json(built, name, split):
    again = get_task(name).build_dataset(split, None, 0)
    assert again == built[name][split]
    assert json.loads(json.dumps(again)) == again
    assert get_task(name).build_dataset(split, None, 1) != again


def test_encode(built):
    lm = get_task("text_lm").encode(built["text_lm"]["test"][0])
    assert lm == MultimodalExample(
        task="text_lm", segments=(("text", ""),), target_text=built["text_lm"]["test"][0]["text"]
    )
    arith = get_task("text_arith").encode({"prompt": "three plus four", "answer": "7"})
    assert arith == MultimodalExample(task="text_arith", segments=(("text", "three plus four"),), target_text="7")
    assert get_task("text_arith").generation.max_new_tokens == 6


def test_chance(built):
    assert get_task("text_lm").chance("bits_per_byte", [], []) == 8.0
    arith = get_task("text_arith")
    test = [{"answer": a} for a in ("7", "7", "3", "5")]
    assert arith.chance("exact_match", [], test) == 0.5
    real = arith.chance("exact_match", built["text_arith"]["train"], built["text_arith"]["test"])
    assert 0.0 < real < 0.1
