"""Decoding a row's media: image files (PNG, JPEG, anything Pillow reads) to the grayscale
arrays the image encoder takes, audio files (WAV, FLAC, anything libsndfile reads) to mono
clips at the model's sample rate.

A field's value is a path (relative to the row's manifest), the file's bytes (a WebDataset
member), or a Hugging Face Image/Audio feature's stored {"bytes", "path"}.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pathways_mm.data.sources.base import BadSample, Row
from pathways_mm.data.sources.limits import check_audio_header, check_bytes, open_image
from pathways_mm.data.sources.paths import media_path
from pathways_mm.encoders.audio import Audio, read_clip
from pathways_mm.encoders.vision import MediaError


def _file(row: Row, field: str, what: str) -> tuple[Any, str]:
    """(a path or a binary stream, how to name it in a message) for a media field: a path only
    inside the row's folder or data.media_roots (`paths.media_path`), no larger than data.max_media_bytes."""
    value = row.fields[field]
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a Hugging Face Image/Audio feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        check_bytes(len(value), f"{row.where} field {field!r}", row.rules)
        return io.BytesIO(value), f"{row.where} field {field!r}"
    if isinstance(value, str) and value:
        path = media_path(row, value, what)
        if not path.is_file():
            raise BadSample(f"{row.where}: {what} file not found: {path}")
        check_bytes(path.stat().st_size, str(path), row.rules)
        return path, f"{row.where}: {path}"  # the manifest line too: where to fix it
    raise BadSample(f"{row.where}: field {field!r} holds {type(value).__name__}; expected a path to a {what} file")


def decode_image(row: Row, field: str) -> np.ndarray:
    """uint8 [H, W] grayscale (colour is converted with Pillow's luminance weights)."""
    src, name = _file(row, field, "image")
    try:
        with open_image(src, name, row.rules) as img:
            return np.asarray(img.convert("L"))
    except BadSample:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(f"{name}: not an image Pillow can read ({type(e).__name__}: {e})") from None


def decode_audio(row: Row, field: str, sample_rate: int) -> Audio:
    """Mono float32 samples at `sample_rate` (`read_clip`: the decoder `predict` uses too)."""
    src, name = _file(row, field, "audio")
    check_audio_header(src, name, row.rules)
    try:
        return read_clip(src, sample_rate)
    except MediaError as e:
        raise BadSample(f"{name}: {e}") from None
