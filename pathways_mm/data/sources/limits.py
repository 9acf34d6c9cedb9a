"""How large a declared task's media may be, checked before they are decoded: a file's size from
the file system, an image's size from its header (`Image.open` decodes no pixel), a clip's
length, channels and rate from its header (`soundfile.info`). A 17 KB PNG of 12,000 x 12,000
pixels would otherwise take 2.3 GB and seconds to decode in every worker; a WAV header claiming
hours of 1,024 channels would make the reader allocate them.

The limits are `MediaRules` (`data.max_media_bytes`, `data.max_image_pixels`,
`data.max_audio_channels`, `model.audio.max_seconds`); what is past them is a bad sample.
"""

from __future__ import annotations

import warnings
from typing import Any

from PIL import Image

from pathways_mm.data.sources.base import BadSample, MediaRules


def check_bytes(size: int, name: str, rules: MediaRules) -> None:
    """A media file or field of `size` bytes."""
    if size > rules.max_bytes:
        raise BadSample(f"{name}: {size} bytes of media; data.max_media_bytes allows {rules.max_bytes}")


def open_image(src: Any, name: str, rules: MediaRules) -> Image.Image:
    """`Image.open` (the header only), refused past data.max_image_pixels before any pixel is
    decoded. Pillow warns past its own MAX_IMAGE_PIXELS (89 million) and refuses twice that (the
    top of data.max_image_pixels' range): the warning is silenced, our limit decides."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
    except Image.DecompressionBombError as e:
        raise BadSample(f"{name}: an image past data.max_image_pixels ({rules.max_image_pixels}): {e}") from None
    width, height = img.size
    if width * height > rules.max_image_pixels:
        img.close()
        raise BadSample(
            f"{name}: an image of {width} x {height} pixels; data.max_image_pixels allows {rules.max_image_pixels}"
        )
    return img


def check_audio_header(src: Any, name: str, rules: MediaRules) -> None:
    """A clip's length, channels and decoded size from its header; a stream is rewound after.
    A header libsndfile cannot read passes: the decoder then names the file as unreadable."""
    import soundfile  # only a declared task's audio needs it (see sources/__init__)

    try:
        info = soundfile.info(src)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
        return
    finally:
        if hasattr(src, "seek"):
            src.seek(0)
    if info.channels > rules.max_audio_channels:
        raise BadSample(
            f"{name}: {info.channels} audio channels; data.max_audio_channels allows {rules.max_audio_channels}"
        )
    seconds = info.frames / max(info.samplerate, 1)
    if seconds > rules.max_audio_seconds:
        raise BadSample(
            f"{name}: a clip of {seconds:.2f} s is longer than model.audio.max_seconds ({rules.max_audio_seconds})"
        )
    decoded = info.frames * info.channels * 4  # float32 samples, all channels, before mixing to mono
    if decoded > rules.max_bytes:
        raise BadSample(
            f"{name}: {info.frames} frames x {info.channels} channels decode to {decoded} bytes; "
            f"data.max_media_bytes allows {rules.max_bytes}"
        )
