"""Build the text vocabulary (encoders/assets/pmm_text.model) deterministically from the corpus.

    python -m pathways_mm.encoders.build_tokenizer            # rebuild the committed file
    python -m pathways_mm.encoders.build_tokenizer --check    # rebuild in a temp dir, compare

The same inputs in the same order, one thread and no sampling give a byte-identical model, so
`--check` proves the committed file is what this script makes.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from pathways_mm.encoders.text import default_model_path
from pathways_mm.tasks.corpus import number_text, split_paragraphs

VOCAB_SIZE = 4096
NUMBER_SEED = 0

TRAINER_ARGS = dict(
    model_type="bpe",  # 4.07 held-out bytes/token vs 4.04 for unigram, and builds 5x faster
    vocab_size=VOCAB_SIZE,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    # determinism: read every sentence in order, one thread, no shuffling or sampling
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,
    max_sentence_length=8192,  # bytes; the longest corpus paragraph is ~2.3 kB
    minloglevel=2,
)


def training_text(num_paragraphs: int | None = None) -> list[str]:
    """Train-split corpus paragraphs, then number text; `num_paragraphs` cuts both (for tests)."""
    paragraphs = split_paragraphs("train")
    numbers = number_text(NUMBER_SEED)
    if num_paragraphs is not None:
        paragraphs, numbers = paragraphs[:num_paragraphs], numbers[:num_paragraphs]
    return paragraphs + numbers


def build(out: Path, num_paragraphs: int | None = None, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train the model and write it to `out` (atomically)."""
    writer = io.BytesIO()  # no model_prefix: file paths would otherwise land in the proto
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text(num_paragraphs)),
        model_writer=writer,
        **{**TRAINER_ARGS, "vocab_size": vocab_size},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(writer.getvalue())
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=default_model_path(), help="where to write the model")
    p.add_argument(
        "--check", action="store_true", help="rebuild in a temp dir and compare with --out; exit 1 if different"
    )
    # a small build for the determinism test; not for real use
    p.add_argument("--num-paragraphs", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    start = time.perf_counter()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = build(Path(tmp) / "check.model", args.num_paragraphs, args.vocab_size).read_bytes()
        same = args.out.is_file() and args.out.read_bytes() == fresh
        print(
            f"{args.out}: {'matches' if same else 'DIFFERS from'} a fresh build ({time.perf_counter() - start:.1f} s)"
        )
        return 0 if same else 1
    build(args.out, args.num_paragraphs, args.vocab_size)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
