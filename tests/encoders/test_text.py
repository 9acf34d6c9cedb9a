"""The text tokenizer: exact round-trips, split digits, special ids, a reproducible build."""

from __future__ import annotations

import random

import pytest

from pathways_mm.encoders import build_tokenizer
from pathways_mm.encoders.text import SPACE_MARK, TextTokenizer, default_model_path, load_tokenizer


def random_unicode(seed: int, length: int) -> str:
    """Random code points from the whole range, surrogates excluded (they are not UTF-8)."""
    rng = random.Random(seed)
    chars = []
    while len(chars) < length:
        cp = rng.choice((rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)))
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


NASTY = [
    "",
    " ",
    "   leading and trailing   ",
    "a  b   c    d",
    "\t\ttabs\tinside\t",
    "\n",
    "line one\nline two\r\nline three\n\n",
    SPACE_MARK,
    f"a{SPACE_MARK}b {SPACE_MARK}{SPACE_MARK} c",
    "emoji 🙂👩‍👩‍👧 flags 🇬🇧",
    "中文字符 と 日本語 한국어",
    "NUL\x00inside\x00",
    "e\u0301 n\u0303 combining\u0308\u0308",
    "\ufeffBOM and \u200bzero width",
    "Æ æ Q ’ — rare corpus characters",
    "In the beginning God created the heaven and the earth.",
    "three hundred and twenty-one = 321",
    "<0x41> <pad> <s> </s> <unk> look like special pieces",
] + [random_unicode(seed, 64) for seed in range(8)]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return load_tokenizer()


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.sp.unk_id() not in ids  # byte fallback: nothing becomes <unk>
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids)


@pytest.mark.parametrize("text, digits", [("12345", "12345"), ("x2024y", "2024"), ("in 1611, 400 years", "1611400")])
def test_every_digit_is_its_own_piece(tok, text, digits):
    pieces = tok.pieces(text)
    digit_pieces = [p.replace(SPACE_MARK, "") for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list(digits)


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == build_tokenizer.VOCAB_SIZE == 4096
    assert (tok.pad_id, tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert all(tok.sp.piece_to_id(f"<0x{b:02X}>") != tok.sp.unk_id() for b in range(256))


def test_compresses_english(tok):
    text = "And the LORD spake unto Moses, saying, Speak unto the children of Israel."
    assert len(text.encode()) / len(tok.encode(text)) > 3.0


def test_build_is_deterministic(tmp_path):
    a = build_tokenizer.build(tmp_path / "a.model", num_paragraphs=300, vocab_size=600)
    b = build_tokenizer.build(tmp_path / "b.model", num_paragraphs=300, vocab_size=600)
    assert a.read_bytes() == b.read_bytes()
    assert TextTokenizer(a).vocab_size == 600


def test_committed_model_matches_a_fresh_build():
    assert build_tokenizer.main(["--check", "--out", str(default_model_path())]) == 0


def test_check_flags_a_different_file(tmp_path, capsys):
    other = tmp_path / "other.model"
    other.write_bytes(b"not a model")
    assert build_tokenizer.main(["--check", "--out", str(other), "--num-paragraphs", "300", "--vocab-size", "600"]) == 1
    assert "DIFFERS" in capsys.readouterr().out
