"""Text encoder: a lossless sentencepiece vocabulary (byte fallback, split digits), as in PaLM.

Encoding never loses a character: whitespace is kept verbatim, anything outside the vocabulary
falls back to its UTF-8 bytes, and a literal U+2581 (sentencepiece's space marker) is encoded
as bytes so that decoding cannot mistake it for a space.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

import sentencepiece as spm

SPACE_MARK = "\u2581"
DEFAULT_MODEL = "pmm_text.model"


def default_model_path() -> Path:
    return Path(str(resources.files("pathways_mm.encoders") / "assets" / DEFAULT_MODEL))


class TextTokenizer:
    """Sentencepiece wrapper with exact round-trips. Special ids: pad, bos, eos (unk is unused)."""

    def __init__(self, model_path: str | Path | None = None):
        path = Path(model_path) if model_path else default_model_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {path} (rebuild it with `python -m pathways_mm.encoders.build_tokenizer`)"
            )
        self.path = path
        self.model_bytes = path.read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self._byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self._piece_bytes = self._decode_table()

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the model file: checkpoints record it so a different vocabulary is refused."""
        return hashlib.sha256(self.model_bytes).hexdigest()[:16]

    def _decode_table(self) -> list[bytes]:
        table = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                table.append(bytes([int(piece[3:5], 16)]))
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                table.append(b"")
            else:
                table.append(piece.replace(SPACE_MARK, " ").encode("utf-8"))
        return table

    def encode(self, text: str) -> list[int]:
        if SPACE_MARK not in text:
            return self.sp.encode(text, out_type=int) if text else []
        ids: list[int] = []
        mark = [self._byte_ids[b] for b in SPACE_MARK.encode("utf-8")]
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids.extend(mark)
            if part:
                ids.extend(self.sp.encode(part, out_type=int))
        return ids

    def decode_bytes(self, ids) -> bytes:
        table = self._piece_bytes
        return b"".join(table[i] for i in ids if 0 <= i < len(table))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def pieces(self, text: str) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self.encode(text)]


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_path: str | None = None) -> TextTokenizer:
    return TextTokenizer(model_path)
